import Foundation
import KubeObjects
import KubernetesAPI

/// The agent's source on a live cluster: list, then watch, Services and EndpointSlices.
public enum APIWatchSource {
    public static func events(_ options: KubernetesSourceOptions) -> AsyncStream<SourceEvent> {
        let (stream, continuation) = AsyncStream<SourceEvent>.makeStream()
        do {
            let task = Task {
                var delay = Duration.milliseconds(500)
                while !Task.isCancelled {
                    do {
                        let objects = try await KubernetesSource.load(options)
                        continuation.yield(.listed(.services, objects))
                        continuation.yield(.listed(.endpointSlices, objects))
                        return
                    } catch {
                        continuation.yield(.unavailable(.services, message: "\(error)"))
                        try? await Task.sleep(for: delay)
                        delay = min(delay * 2, .seconds(30))
                    }
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
        return stream
    }
}
