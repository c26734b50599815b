import Foundation
import KubeObjects
import KubernetesAPI

/// Source events the agent's loop has not taken yet, coalesced by what they are about, as kube-proxy's
/// change trackers and client-go's queue keep one pending entry per object.
///
/// Why: the loop runs a sync (a kernel transaction, up to seconds with iptables-legacy) between events. A queue
/// of every event would grow with the event rate for as long as a sync takes, and with `--min-sync-period 0s`
/// the loop would then run one sync per queued event. Here a newer change of an object replaces the older
/// one, and a list of a kind replaces every pending change and report of that kind, so what waits is bounded by the
/// number of objects (which the watch caps) plus a few entries per kind, and the loop takes everything that
/// arrived during a sync at once, into one sync.
///
/// Order is kept where it matters: an entry that is replaced moves to the end, so a change that comes after
/// an "undecodable" report of the same object still comes after it, and the last of `.unavailable` and
/// `.connected` of a kind comes last (an outage that is already over is still seen, and confirmed by a sync).
final class PendingSourceEvents: @unchecked Sendable {
    /// What an event is about: later events with the same key supersede earlier ones.
    enum Key: Hashable {
        case object(APIResource, ObjectName)
        case listed(APIResource)
        case invalid(APIResource, ObjectName?)
        case connected(APIResource)
        case unavailable(APIResource)
        case restarted(APIResource, WatchRestartReason)
    }

    private struct Entry {
        var key: Key
        var event: SourceEvent
        /// When the first of the events this entry stands for arrived (how long the change has waited).
        var seen: Date
        /// How many events it stands for (metrics count each watch restart and outage report).
        var occurrences: Int
    }

    private let lock = NSLock()
    /// In arrival order; nil where an entry was superseded (compacted when holes pile up).
    private var entries: [Entry?] = []
    private var index: [Key: Int] = [:]

    /// Adds an event; true when the buffer was empty, i.e. the caller must wake the loop (a wake is already
    /// pending otherwise).
    func add(_ event: SourceEvent, seen: Date) -> Bool {
        lock.withLock {
            let wasEmpty = index.isEmpty
            let key = Self.key(event)
            var first = seen, occurrences = 1
            if let i = index.removeValue(forKey: key) {
                first = min(first, entries[i]!.seen)
                occurrences += entries[i]!.occurrences
                entries[i] = nil
            }
            if case .listed(let kind, _, _, _) = event {
                // The list is the whole kind, and says what of it is undecodable now: pending changes and
                // reports of it are older news.
                for (k, i) in index {
                    switch k {
                    case .object(kind, _), .invalid(kind, _): entries[i] = nil; index[k] = nil
                    default: break
                    }
                }
            }
            index[key] = entries.count
            entries.append(Entry(key: key, event: event, seen: first, occurrences: occurrences))
            if entries.count > 64 && index.count * 2 < entries.count { compact() }
            return wasEmpty
        }
    }

    /// Everything pending, oldest first, and empties the buffer.
    func drain() -> [(event: SourceEvent, seen: Date, occurrences: Int)] {
        lock.withLock {
            let out = entries.compactMap { $0.map { ($0.event, $0.seen, $0.occurrences) } }
            entries = []
            index = [:]
            return out
        }
    }

    /// How many entries are pending (tests).
    var count: Int { lock.withLock { index.count } }

    private func compact() {
        let live: [Entry] = entries.compactMap { $0 }
        entries = live
        index = [:]
        for (i, e) in live.enumerated() { index[e.key] = i }
    }

    static func key(_ event: SourceEvent) -> Key {
        switch event {
        case .listed(let kind, _, _, _): return .listed(kind)
        case .changed(.service(let s)): return .object(.services, s.id)
        case .changed(.serviceDeleted(let n)): return .object(.services, n)
        case .changed(.endpointSlice(let e)): return .object(.endpointSlices, e.id)
        case .changed(.endpointSliceDeleted(let n)): return .object(.endpointSlices, n)
        case .invalidObject(let kind, let name, _): return .invalid(kind, name)
        case .connected(let kind): return .connected(kind)
        case .unavailable(let kind, _, _): return .unavailable(kind)
        case .watchRestarted(let kind, let reason): return .restarted(kind, reason)
        }
    }
}
