import Foundation
import KubeObjects
import KubernetesAPI

/// Where Services and EndpointSlices come from: files (`-f`, `-` for stdin) or the Kubernetes API.
public enum ObjectSource: Sendable {
    case files([String])
    case api(KubernetesSourceOptions)
}

/// The first stage of the pipeline: reads every input into one `ClusterObjects`. Strict: the first bad
/// object stops the one-shot commands with exit 65 naming file, object and field (the agent is lenient
/// instead, see `SyncAgent`).
public enum ObjectLoading {
    /// `maxInputBytes`: no file (or stdin) may be larger; more is exit 65 naming the limit.
    public static func load(_ source: ObjectSource,
                            maxInputBytes: Int = InputReader.defaultLimit) async throws(PipelineError) -> ClusterObjects {
        switch source {
        case .api(let options):
            do { return try await KubernetesSource.load(options) } catch {
                throw PipelineError(code: error.exitCode, error.description)
            }
        case .files(let names):
            return try loadFiles(names, maxInputBytes: maxInputBytes)
        }
    }

    /// What people should hear before loading (credentials about to go to an `http://` server), without
    /// contacting anything; a configuration that cannot be resolved says nothing here (`load` will).
    public static func warnings(_ source: ObjectSource) -> [String] {
        guard case .api(let options) = source else { return [] }
        return (try? KubernetesSource.warnings(options)) ?? []
    }

    public static func loadFiles(_ names: [String],
                                 maxInputBytes: Int = InputReader.defaultLimit) throws(PipelineError) -> ClusterObjects {
        var objects = ClusterObjects()
        var readStdin = false
        for name in names {
            let bytes: [UInt8]
            if name == "-" {
                if readStdin { throw PipelineError(.usage, "-f - given more than once: standard input can be read only once") }
                readStdin = true
                bytes = try readAll(fd: 0, name: "<stdin>", limit: maxInputBytes)
            } else {
                let fd = open(name, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: name, isDirectory: &isDir) {
                        throw PipelineError(.noInput, "\(name): cannot read \(isDir.boolValue ? "a directory" : "the file (permission denied?)")")
                    }
                    throw PipelineError(.noInput, "\(name): no such file")
                }
                defer { close(fd) }
                bytes = try readAll(fd: fd, name: name, limit: maxInputBytes)
            }
            do {
                try DocumentLoader.load(bytes, source: name == "-" ? "<stdin>" : name, into: &objects)
            } catch {
                throw PipelineError(.dataError, error.description)
            }
        }
        return objects
    }

    /// Reads a whole file or pipe into one buffer, never more than `limit` (KubeObjects' InputReader).
    static func readAll(fd: Int32, name: String, limit: Int) throws(PipelineError) -> [UInt8] {
        do {
            return try InputReader.readAll(fd: fd, name: name, limit: limit)
        } catch {
            switch error {
            case .tooLarge: throw PipelineError(.dataError, error.description)
            case .isDirectory, .failed: throw PipelineError(.noInput, error.description)
            }
        }
    }
}
