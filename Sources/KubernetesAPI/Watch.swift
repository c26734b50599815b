import Foundation
import KubeObjects

/// The two resources a watch follows. The raw values are the API's plural names, fit for metric labels.
public enum APIResource: String, Sendable, CaseIterable {
    case services
    case endpointSlices = "endpointslices"

    var resource: Resource {
        switch self {
        case .services: return .services
        case .endpointSlices: return .endpointSlices
        }
    }
}

/// Why a watch was opened again (metric label values).
public enum WatchRestartReason: String, Sendable {
    /// The server ended the watch normally (its `timeoutSeconds`): watch again from the last version.
    case timeout
    /// 410: the version is too old (etcd compacted it). A new list follows.
    case gone
    /// The connection dropped, the server fell silent, sent an ERROR event or a line that could not be read:
    /// watch again from the last version after a backoff.
    case error
}

/// An object that could not be decoded: its name (nil when even `metadata.name` is unreadable) and why.
public struct InvalidObject: Sendable, Hashable {
    public var name: ObjectName?
    public var message: String
    public init(name: ObjectName?, message: String) { self.name = name; self.message = message }
}

/// What `KubernetesWatch.events()` reports.
///
/// The consumer keeps one store per resource: `.listed` replaces it, `.changed` updates it. Nothing else
/// changes it: `.invalidObject`, `.watchRestarted` and `.unavailable` are for logs and metrics, and the
/// consumer keeps (and keeps applying) the state it has while the API is unreachable, as kube-proxy does.
public enum SourceEvent: Sendable {
    /// The full set of objects of `resource` (all namespaces watched): replace what you have.
    ///
    /// Sent once every namespace of the resource has been listed for the first time (so the first one is
    /// never partial: with `--namespace a --namespace b` it waits for both), and again after every relist
    /// (a 410). `.changed` events of a resource only come after its first `.listed`. The first sync should
    /// wait for the first `.listed` of both resources. `resourceVersion` is that of the list that completed
    /// the set (informational: with several namespaces each has its own).
    ///
    /// EndpointSlices are never filtered by the label selector (only Services are, on the server): a slice
    /// can arrive before its Service, so the consumer ignores slices whose Service it does not have.
    ///
    /// `invalid`: every object of the resource that is undecodable now (the lists' and the watch's reports
    /// that still hold): the consumer replaces what it knows of them, so an object fixed meanwhile drops
    /// out even when the event that fixed it was coalesced away.
    case listed(APIResource, ClusterObjects, resourceVersion: String, invalid: [InvalidObject] = [])
    case changed(ObjectChange)
    /// One object (in a list or a watch event) that could not be decoded; `message` names the object and the
    /// field. Its last good version is kept: the watch sends no change for it, and a later `.listed` carries
    /// the last good copy instead of leaving it out, so a broken update never deletes working rules. An
    /// object that was never decodable is absent. `name` is nil when even `metadata.name` is unreadable.
    case invalidObject(APIResource, ObjectName?, message: String)
    /// A watch request was answered (the stream is open): the API is reachable for `resource` again. Sent
    /// on every (re)opened watch, so a consumer can tell an outage has ended even when nothing changed.
    case connected(APIResource)
    /// The watch ended and is being opened again (see `WatchRestartReason`). For `.error` an `.unavailable`
    /// with the cause and the wait follows.
    case watchRestarted(APIResource, WatchRestartReason)
    /// A list or watch request failed (connection refused, TLS, 401/403, 5xx, a broken watch stream, an
    /// answer that is not a Kubernetes list) and is tried again after `retryIn`. The error's `kind` and
    /// message say which; `.configuration` (a 400, say a bad label selector) will not heal by itself.
    case unavailable(APIResource, KubernetesAPIError, retryIn: Duration)
}

/// Timing and bounds of the list+watch loops. The defaults are client-go's; tests shorten them.
public struct WatchTuning: Sendable {
    /// First wait after a failure; doubles (with ±20 % jitter) up to `maxBackoff`, back to this after a
    /// success (a list, or a watch that delivered an event or bookmark).
    public var initialBackoff: Duration
    public var maxBackoff: Duration
    /// `timeoutSeconds` of each watch request, drawn at random from this range so that many agents do
    /// not re-watch in step.
    public var watchTimeoutSeconds: ClosedRange<Int>
    /// How much longer than `timeoutSeconds` a watch may stay silent before its connection counts as dead.
    public var silenceGrace: Duration
    /// The longest watch line (one event) accepted; a longer one breaks that watch (`.error`, re-watch).
    public var maxLineBytes: Int

    public init(initialBackoff: Duration = .milliseconds(800), maxBackoff: Duration = .seconds(30),
                watchTimeoutSeconds: ClosedRange<Int> = 300...600, silenceGrace: Duration = .seconds(30),
                maxLineBytes: Int = 16 << 20) {
        self.initialBackoff = initialBackoff
        self.maxBackoff = maxBackoff
        self.watchTimeoutSeconds = watchTimeoutSeconds
        self.silenceGrace = silenceGrace
        self.maxLineBytes = maxLineBytes
    }

    /// The watch client's idle read timeout: longer than any `timeoutSeconds` it asks for.
    var watchReadTimeout: Duration { .seconds(watchTimeoutSeconds.upperBound) + silenceGrace }

    func validate() throws(KubernetesAPIError) {
        guard initialBackoff > .zero, maxBackoff >= initialBackoff else {
            throw KubernetesAPIError(.configuration, "the watch backoff must be positive and its cap at least the initial wait")
        }
        guard watchTimeoutSeconds.lowerBound >= 1, silenceGrace > .zero else {
            throw KubernetesAPIError(.configuration, "the watch timeout and its grace must be positive")
        }
        guard maxLineBytes >= 1024 else {
            throw KubernetesAPIError(.configuration, "the longest watch line must be at least 1 KiB")
        }
    }
}

/// Services and EndpointSlices from a live API server, kept current: list, then watch from the list's
/// resourceVersion (client-go's reflector), for each resource and each `--namespace` concurrently.
///
/// Each list+watch loop has its own HTTPS session (and runs an exec credential plugin itself). Lists are
/// paged as in `KubernetesSource.load` but lenient: an item that cannot be decoded is reported and left
/// out. Watches re-open from the last resourceVersion seen (events and bookmarks), relist on 410, and back
/// off with jitter on failures. Messages never carry a token (the session redacts them).
public final class KubernetesWatch: Sendable {
    let options: KubernetesSourceOptions
    let environment: [String: String]
    let tuning: WatchTuning
    let connection: ClusterConnection

    /// Checks the options and finds the cluster (in-cluster or kubeconfig, as `KubernetesSource.load`) without
    /// contacting it: connection problems are reported as events later, configuration problems here.
    public init(_ options: KubernetesSourceOptions,
                environment: [String: String] = ProcessInfo.processInfo.environment,
                tuning: WatchTuning = WatchTuning()) throws(KubernetesAPIError) {
        try KubernetesSource.validate(options)
        try tuning.validate()
        self.options = options
        self.environment = environment
        self.tuning = tuning
        self.connection = try KubernetesSource.resolveConnection(options, environment: environment)
    }

    /// Where the events come from, in words (as `KubernetesSource.describeSource`).
    public var sourceDescription: String { "\(connection.origin), server \(connection.server.display)" }

    /// Starts the loops and reports what they see until the consuming task is cancelled or stops iterating;
    /// then every loop ends and its connections close (an open watch request is cancelled at once).
    ///
    /// The stream itself does not coalesce: the consumer must keep reading (the agent moves every event
    /// at once into a buffer that keeps one entry per object). What the loops hold themselves is one copy
    /// of each object, to hand out whole sets on a relist, at most `maxItems` per namespace watched: a
    /// watch that would add more ends with an error naming the limit, like a list that long.
    public func events() -> AsyncStream<SourceEvent> {
        let (stream, continuation) = AsyncStream.makeStream(of: SourceEvent.self)
        let scopes = Lister.scopes(options)
        var reflectors: [Reflector] = []
        for resource in APIResource.allCases {
            let product = options.maxItems.multipliedReportingOverflow(by: scopes.count)
            let store = ResourceStore(resource, scopes: scopes, limit: product.overflow ? Int.max : product.partialValue,
                                      continuation: continuation)
            for scope in scopes {
                reflectors.append(Reflector(resource: resource, namespace: scope,
                                            labelSelector: resource == .services ? options.labelSelector : nil,
                                            connection: connection, options: options, environment: environment,
                                            tuning: tuning, store: store))
            }
        }
        let loops = reflectors
        let task = Task {
            await withTaskGroup(of: Void.self) { group in
                for reflector in loops { group.addTask { await reflector.run() } }
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}
