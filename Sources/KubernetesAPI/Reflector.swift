import Foundation
import KubeObjects
import NIOCore

/// One list+watch loop: one resource in one scope (a namespace, or all of them).
struct Reflector: Sendable {
    let resource: APIResource
    let namespace: String?
    let labelSelector: String?
    let connection: ClusterConnection
    let options: KubernetesSourceOptions
    let environment: [String: String]
    let tuning: WatchTuning
    let store: ResourceStore

    /// How one watch request ended.
    struct WatchEnd {
        enum Kind {
            case timeout
            case gone
            case broken(KubernetesAPIError)
            /// More objects than the item limit: relist (which fails at the same limit while the server
            /// has that many) after a growing backoff.
            case overLimit(KubernetesAPIError)
        }
        var kind: Kind
        /// At least one event or bookmark arrived: the connection works, the backoff starts over.
        var progressed: Bool
    }

    /// Lists, then watches, until the task is cancelled. Never throws: every failure becomes an event and
    /// a wait.
    func run() async {
        var session: APISession? = nil
        var backoff = Backoff(initial: tuning.initialBackoff, cap: tuning.maxBackoff)
        // nil: there is no list to continue from (never listed, or 410).
        var version: String? = nil
        // The last watch ended at the item limit: until a watch ends normally, a list that works does not
        // reset the backoff either (with several namespaces the others can keep the store full, and this
        // loop would list again every initial backoff).
        var overLimitStreak = false
        loop: while !Task.isCancelled {
            var delay: Duration? = nil
            do throws(KubernetesAPIError) {
                if session == nil {
                    session = try await APISession.open(connection, timeout: options.requestTimeout,
                                                        environment: environment, watchReadTimeout: tuning.watchReadTimeout)
                }
                let active = session!
                if version == nil {
                    let list = try await Lister(session: active, pageSize: options.pageSize, maxItems: options.maxItems,
                                                maxPages: options.maxPages, listTimeout: options.listTimeout)
                        .list(resource.resource, namespace: namespace, labelSelector: labelSelector, lenient: true)
                    if Task.isCancelled { break loop }
                    store.listed(scope: namespace, list.objects, invalid: list.invalid, resourceVersion: list.resourceVersion)
                    version = list.resourceVersion
                    if !overLimitStreak { backoff.reset() }
                }
                var from = version!
                let end = try await watch(active, from: &from)
                version = from
                if Task.isCancelled { break loop }
                var overLimit = false
                if case .overLimit = end.kind { overLimit = true }
                // (Objects arrived, but too many: the backoff keeps growing.)
                overLimitStreak = overLimit || (overLimitStreak && !end.progressed)
                if end.progressed && !overLimit { backoff.reset() }
                switch end.kind {
                case .overLimit(let error):
                    store.emit(.watchRestarted(resource, .error))
                    version = nil
                    let wait = backoff.next()
                    store.emit(.unavailable(resource, error, retryIn: wait))
                    delay = wait
                case .timeout:
                    store.emit(.watchRestarted(resource, .timeout))
                    // A server that ends every watch at once must not make us spin.
                    if !end.progressed { delay = backoff.next() }
                case .gone:
                    store.emit(.watchRestarted(resource, .gone))
                    version = nil
                    if !end.progressed { delay = backoff.next() }
                case .broken(let error):
                    store.emit(.watchRestarted(resource, .error))
                    let wait = backoff.next()
                    store.emit(.unavailable(resource, error, retryIn: wait))
                    delay = wait
                }
            } catch {
                if Task.isCancelled { break loop }
                let wait = backoff.next()
                store.emit(.unavailable(resource, error, retryIn: wait))
                delay = wait
            }
            if let delay { try? await Task.sleep(for: delay) }
        }
        await session?.close()
    }

    /// One watch request from `version`, which follows the events and bookmarks. Throws when the request
    /// gets no 2xx answer (other than 410, which is `.gone`).
    func watch(_ session: APISession, from version: inout String) async throws(KubernetesAPIError) -> WatchEnd {
        let resource = self.resource.resource
        let base = resource.path(namespace: namespace)
        var query: [(String, String)] = []
        if let labelSelector { query.append(("labelSelector", labelSelector)) }
        query += [("watch", "1"), ("resourceVersion", version), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", String(Int.random(in: tuning.watchTimeoutSeconds)))]
        let pathAndQuery = base + queryString(query)
        let source = session.displayURL(base) + " (watch)"

        var lines = LineSplitter(limit: tuning.maxLineBytes)
        var progressed = false
        var ending: WatchEnd.Kind? = nil
        var current = version
        let store = self.store, resourceKind = self.resource
        let end = try await session.stream(pathAndQuery, onOpen: { store.emit(.connected(resourceKind)) }) { chunk throws(KubernetesAPIError) -> Bool in
            do {
                try lines.feed(chunk.readableBytesView) { line in
                    switch handle(line, source: source, session: session, version: &current, progressed: &progressed) {
                    case .next: return true
                    case .end(let kind): ending = kind; return false
                    }
                }
            } catch {
                throw KubernetesAPIError(.badData,
                    "\(source): a watch event is longer than \(tuning.maxLineBytes) bytes; the watch is opened again")
            }
            return ending == nil
        }
        version = current
        switch end {
        case .answered(let response):
            if response.status == 410 { return WatchEnd(kind: .gone, progressed: false) }
            throw session.failure(response, verb: "watch", resource: resource, namespace: namespace, pathAndQuery: pathAndQuery)
        case .broken(let error):
            return WatchEnd(kind: ending ?? .broken(error), progressed: progressed)
        case .ended:
            if ending == nil, let rest = lines.remainder() {
                // The server ended the body after a last line without its newline.
                if case .end(let kind) = handle(rest, source: source, session: session, version: &current, progressed: &progressed) {
                    ending = kind
                }
                version = current
            }
            return WatchEnd(kind: ending ?? .timeout, progressed: progressed)
        }
    }

    enum LineOutcome {
        case next
        case end(WatchEnd.Kind)
    }

    /// One watch event: `{"type": ..., "object": {...}}`.
    func handle(_ line: [UInt8], source: String, session: APISession, version: inout String,
                progressed: inout Bool) -> LineOutcome {
        let event: JSONValue
        do {
            event = try JSONParser.parse(line)
        } catch {
            // The stream's framing can no longer be trusted: open a new watch.
            return .end(.broken(session.badData(
                "\(source): a watch event is not JSON (column \(error.column): \(error.message)); the watch is opened again")))
        }
        guard case .string(let type)? = event["type"], let object = event["object"], case .object = object else {
            return .end(.broken(session.badData("\(source): a watch event without type or object; the watch is opened again")))
        }
        func remember(_ object: JSONValue) {
            if case .string(let v)? = object["metadata"]?["resourceVersion"], !v.isEmpty { version = v }
        }
        switch type {
        case "ADDED", "MODIFIED":
            progressed = true
            let kept: Bool
            do throws(InputError) {
                switch resource {
                case .services:
                    kept = store.changed(.service(try ObjectDecoder.decodeService(object, source: source, locator: "\(type) event")))
                case .endpointSlices:
                    kept = store.changed(.endpointSlice(try ObjectDecoder.decodeEndpointSlice(object, source: source, locator: "\(type) event")))
                }
            } catch {
                kept = store.invalid(looseObjectName(object), message: session.redacted(error.description))
            }
            guard kept else {
                // The version stays before this object, and a relist follows: it is never skipped.
                return .end(.overLimit(session.badData(
                    "\(source): more than \(store.limit) objects would be kept; stopped (the item limit); listing again")))
            }
            remember(object)
            return .next
        case "DELETED":
            progressed = true
            remember(object)
            // Only the name is read: an object that is going away is deleted even when the rest is unreadable.
            guard let name = looseObjectName(object) else {
                store.emit(.invalidObject(resource, nil, message: "\(source): a DELETED event whose object has no metadata.name"))
                return .next
            }
            store.deleted(name)
            return .next
        case "BOOKMARK":
            progressed = true
            remember(object)
            return .next
        case "ERROR":
            let status = StatusObject(object)
            if status?.code == 410 || status?.reason == "Expired" || status?.reason == "Gone" { return .end(.gone) }
            let code = status?.code.map { " (code \($0))" } ?? ""
            let reason = status?.reason.map { " \($0)" } ?? ""
            let message = status?.message.map { ": \($0)" } ?? ""
            return .end(.broken(session.redact(KubernetesAPIError(.unavailable,
                "\(source): the API server ended the watch with an error\(reason)\(code)\(message)", httpStatus: status?.code))))
        default:
            return .end(.broken(session.badData(
                "\(source): a watch event of unknown type \"\(InputErrorText.printable(type))\"; the watch is opened again")))
        }
    }
}

/// The objects of one resource across every scope, and the one place that sends events about them, so
/// that a `.listed` snapshot and the `.changed` events after it come in the order the store saw them.
final class ResourceStore: @unchecked Sendable {
    enum Item {
        case service(Service)
        case endpointSlice(EndpointSlice)
    }

    let resource: APIResource
    private let continuation: AsyncStream<SourceEvent>.Continuation
    private let lock = NSLock()
    private var objects: [ObjectName: Item] = [:]
    /// Named objects that are undecodable now (their last good copy, if any, stays in `objects`), with
    /// why; they count against `limit` too.
    private var invalidNames: [ObjectName: String] = [:]
    /// Per scope, what its last list could not even name.
    private var unnamedInvalid: [String?: [String]] = [:]
    /// Scopes whose first list has not arrived: until it is empty nothing is reported but invalid objects
    /// and failures, so that the first `.listed` is complete.
    private var unlisted: Set<String?>

    /// At most this many objects are kept (the list limit times the namespaces watched): a server that
    /// keeps adding objects in a watch cannot make us hold them without bound.
    let limit: Int

    init(_ resource: APIResource, scopes: [String?], limit: Int, continuation: AsyncStream<SourceEvent>.Continuation) {
        self.resource = resource
        self.unlisted = Set(scopes)
        self.limit = limit
        self.continuation = continuation
    }

    func emit(_ event: SourceEvent) {
        lock.withLock { _ = continuation.yield(event) }
    }

    /// Replaces the objects of `scope` with a new list; objects reported invalid keep their last good copy.
    func listed(scope: String?, _ list: ClusterObjects, invalid: [Lister.InvalidItem], resourceVersion: String) {
        lock.withLock {
            for item in invalid {
                continuation.yield(.invalidObject(resource, item.name, message: item.message))
            }
            let keep = Set(invalid.compactMap(\.name))
            func inScope(_ name: ObjectName) -> Bool { scope == nil || name.namespace == scope }
            objects = objects.filter { name, _ in keep.contains(name) || !inScope(name) }
            // What this list says is undecodable replaces what was known of the scope.
            invalidNames = invalidNames.filter { name, _ in !inScope(name) }
            for item in invalid { if let name = item.name { invalidNames[name] = item.message } }
            unnamedInvalid[scope] = invalid.filter { $0.name == nil }.map(\.message)
            for s in list.services { objects[s.id] = .service(s) }
            for e in list.endpointSlices { objects[e.id] = .endpointSlice(e) }
            unlisted.remove(scope)
            guard unlisted.isEmpty else { return }
            var all = ClusterObjects()
            for name in objects.keys.sorted() {
                switch objects[name]! {
                case .service(let s): all.services.append(s)
                case .endpointSlice(let e): all.endpointSlices.append(e)
                }
            }
            var reports = invalidNames.keys.sorted().map { InvalidObject(name: $0, message: invalidNames[$0]!) }
            for messages in unnamedInvalid.values { reports += messages.map { InvalidObject(name: nil, message: $0) } }
            continuation.yield(.listed(resource, all, resourceVersion: resourceVersion, invalid: reports))
        }
    }

    /// An object a watch event carried that could not be decoded: reported, and its last good copy kept.
    /// False (nothing reported) when it is new and `limit` objects are known already.
    func invalid(_ name: ObjectName?, message: String) -> Bool {
        lock.withLock {
            if let name {
                if objects[name] == nil && invalidNames[name] == nil && objects.count + invalidNames.count >= limit { return false }
                invalidNames[name] = message
            }
            continuation.yield(.invalidObject(resource, name, message: message))
            return true
        }
    }

    /// Keeps and reports an added or modified object; false (nothing kept) when it is new and `limit`
    /// objects are kept already.
    func changed(_ change: ObjectChange) -> Bool {
        lock.withLock {
            let name: ObjectName, item: Item
            switch change {
            case .service(let s): (name, item) = (s.id, .service(s))
            case .endpointSlice(let e): (name, item) = (e.id, .endpointSlice(e))
            case .serviceDeleted, .endpointSliceDeleted: return true
            }
            if objects[name] == nil && invalidNames[name] == nil && objects.count + invalidNames.count >= limit { return false }
            objects[name] = item
            invalidNames[name] = nil
            if unlisted.isEmpty { continuation.yield(.changed(change)) }
            return true
        }
    }

    /// Forgets an object; a name that is not known (never decodable, or never seen) is not reported:
    /// a server cannot make the consumer hold entries for names that do not exist.
    func deleted(_ name: ObjectName) {
        lock.withLock {
            let known = objects.removeValue(forKey: name) != nil
            let wasInvalid = invalidNames.removeValue(forKey: name) != nil
            guard unlisted.isEmpty, known || wasInvalid else { return }
            continuation.yield(.changed(resource == .services ? .serviceDeleted(name) : .endpointSliceDeleted(name)))
        }
    }
}

/// Exponential backoff with ±20 % jitter, never above the cap.
struct Backoff {
    let initial: Duration
    let cap: Duration
    private var current: Duration

    init(initial: Duration, cap: Duration) {
        self.initial = initial
        self.cap = cap
        self.current = initial
    }

    mutating func next() -> Duration {
        let base = min(current, cap)
        current = min(current * 2, cap)
        return min(base * Double.random(in: 0.8...1.2), cap)
    }

    mutating func reset() { current = initial }
}

/// Cuts a watch body into lines (one JSON event each). A line may span chunks and a chunk may hold many
/// lines; no line may grow beyond `limit` bytes, so a server cannot make us buffer without bound.
struct LineSplitter {
    struct TooLong: Error {}

    let limit: Int
    private var pending: [UInt8] = []

    init(limit: Int) { self.limit = limit }

    /// Hands each complete, non-blank line to `line`; stops early when `line` returns false.
    mutating func feed<C: Collection>(_ chunk: C, line: ([UInt8]) -> Bool) throws(TooLong) where C.Element == UInt8 {
        var start = chunk.startIndex
        while let newline = chunk[start...].firstIndex(of: 0x0A) {
            let piece = chunk[start..<newline]
            guard pending.count + piece.count <= limit else { throw TooLong() }
            var whole = pending
            whole.append(contentsOf: piece)
            pending = []
            start = chunk.index(after: newline)
            if !Self.isBlank(whole), !line(whole) { return }
        }
        let rest = chunk[start...]
        guard pending.count + rest.count <= limit else { throw TooLong() }
        pending.append(contentsOf: rest)
    }

    /// What is left after the body ended without a final newline (nil when nothing but blanks).
    mutating func remainder() -> [UInt8]? {
        defer { pending = [] }
        return Self.isBlank(pending) ? nil : pending
    }

    private static func isBlank(_ bytes: [UInt8]) -> Bool {
        bytes.allSatisfy { $0 == 0x20 || $0 == 0x09 || $0 == 0x0D || $0 == 0x0A }
    }
}
