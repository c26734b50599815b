import Foundation
import KubeObjects
import KubernetesAPI
import Logging
import NodeBackend
import RulePlanning
import ServiceLifecycle
import ServiceResolution

/// How the agent runs.
public struct SyncConfiguration: Sendable {
    /// Resolution options; `target` may be `auto` (decided at the first sync, re-checked at each full one).
    public var options: ResolutionOptions
    /// Rule names and knobs; conflicts are always skipped (an agent never stops on data).
    public var settings: PlanSettings
    /// Changes seen within this period after a sync are coalesced into the next one (0: sync at once).
    public var minSyncPeriod: Duration
    /// A full pass that reads the kernel back and repairs drift.
    public var syncPeriod: Duration
    /// Remove our rules on shutdown (default: leave them, so a rolling update never drops traffic).
    public var cleanupOnExit: Bool
    /// The longest wait before retrying a failed sync (backoff doubles from `minSyncPeriod` or 100 ms).
    public var maxRetryDelay: Duration

    public init(options: ResolutionOptions, settings: PlanSettings, minSyncPeriod: Duration = .seconds(1),
                syncPeriod: Duration = .seconds(300), cleanupOnExit: Bool = false, maxRetryDelay: Duration = .seconds(30)) {
        self.options = options; self.settings = settings; self.minSyncPeriod = minSyncPeriod
        self.syncPeriod = syncPeriod; self.cleanupOnExit = cleanupOnExit; self.maxRetryDelay = maxRetryDelay
    }
}

/// What one successful sync did: the agent's log line and metrics come from it.
public struct SyncReport: Sendable {
    public enum Kind: String, Sendable { case full, partial }
    public var kind: Kind
    public var duration: Duration
    /// The kernel changed.
    public var changed: Bool
    public var added: Int
    public var removed: Int
    /// An incremental update failed and a full replacement was done instead.
    public var fellBackToFull: Bool
    public var strategy: TargetStrategy
    public var mappingsByFamily: [String: Int]
    public var skippedByReason: [SkipReason: Int]
    public var services: Int
    public var conntrackDeleted: Int
    /// For each change this sync carried: from when it happened (an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`, else when the agent saw it) to the commit.
    public var programmingLatencies: [Duration]
    /// Every list and watch was working when the sync ran (health counts only such syncs: a node whose
    /// agent has lost the API is not healthy, even though its rules are kept).
    public var inStepWithAPI: Bool
    public var summary: String
    public var at: Date
}

/// Receives what the agent does: metrics, health, tests.
public protocol SyncObserver: Sendable {
    func syncSucceeded(_ report: SyncReport)
    func syncFailed(kind: SyncReport.Kind, reason: String, message: String)
    func sourceEvent(_ event: SourceEvent)
}

/// An observer that does nothing.
public struct NoObserver: SyncObserver {
    public init() {}
    public func syncSucceeded(_ report: SyncReport) {}
    public func syncFailed(kind: SyncReport.Kind, reason: String, message: String) {}
    public func sourceEvent(_ event: SourceEvent) {}
}

/// The node agent's loop, as kube-proxy's sync loop and client-go's informers do it: objects from a
/// source go into a keyed store; a change marks its Service dirty; a sync (at most one per
/// `minSyncPeriod`) re-resolves the dirty Services only, assembles the plan, and sends the kernel only the
/// difference from what it installed last; every `syncPeriod` (and after any kernel error) a full pass
/// compares with the kernel and repairs it. Nothing touches the kernel before both kinds were listed once,
/// and while the API is unreachable the rules stay as they are.
///
/// Runs as a swift-service-lifecycle `Service`: on graceful shutdown (SIGTERM/SIGINT) it finishes the sync
/// in progress (a kernel batch is never left half-done: it is one transaction), optionally removes the
/// rules, and returns.
public final class SyncAgent: ServiceLifecycle.Service, @unchecked Sendable {
    private let configuration: SyncConfiguration
    private let source: @Sendable () -> AsyncStream<SourceEvent>
    private let installer: any RuleInstaller
    private let observer: any SyncObserver
    private let logger: Logger

    public init(configuration: SyncConfiguration, source: @escaping @Sendable () -> AsyncStream<SourceEvent>,
                installer: any RuleInstaller, observer: any SyncObserver = NoObserver(), logger: Logger) {
        self.configuration = configuration
        self.source = source
        self.installer = installer
        self.observer = observer
        self.logger = logger
    }

    enum Input: Sendable {
        /// Source events are waiting in `PendingSourceEvents`.
        case sourceEvents
        case tick
        /// Someone else changed our rules (a change notification): repair with a full pass.
        case drift(String)
        /// The change notifications ended (the monitor failed): resubscribe after the next sync, which is full
        /// because changes may have been missed.
        case driftStopped
        case shutdown
        case sourceEnded
    }

    public func run() async throws {
        let (inputs, continuation) = AsyncStream<Input>.makeStream()
        let source = self.source
        // Events wait here, coalesced, not in `inputs`: see PendingSourceEvents. `inputs` carries at most
        // one wake-up for them at a time.
        let pending = PendingSourceEvents()
        let feeder = Task {
            for await event in source() {
                if pending.add(event, seen: Date()) { continuation.yield(.sourceEvents) }
            }
            continuation.yield(.sourceEnded)
        }
        var loop = Loop(agent: self, continuation: continuation, pending: pending)
        await withGracefulShutdownHandler {
            await loop.run(inputs)
        } onGracefulShutdown: {
            continuation.yield(.shutdown)
        }
        feeder.cancel()
        loop.drift?.cancel()
        loop.cancelWakeup()
        if configuration.cleanupOnExit {
            do {
                let removed = try installer.remove(configuration.settings)
                logger.info("removed our rules on exit", metadata: ["removed": "\(removed)"])
            } catch {
                logger.error("could not remove our rules on exit", metadata: ["error": "\(error.description)"])
            }
        } else {
            logger.info("stopping; the rules stay in place (--cleanup-on-exit removes them)")
        }
    }

    /// The loop's state; one task owns it.
    struct Loop {
        let agent: SyncAgent
        let continuation: AsyncStream<Input>.Continuation
        let pending: PendingSourceEvents
        var configuration: SyncConfiguration { agent.configuration }

        var store = ObjectStore()
        var planner: IncrementalPlanner? = nil
        var strategy: TargetStrategy? = nil
        var listed: Set<APIResource> = []
        var dirty: Set<ObjectName> = []
        /// What this process installed last (nil: unknown, so the next sync is a full pass).
        var installed: RulePlan? = nil
        /// The invalid-object diagnostics `installed` was planned with.
        var installedWarnings: [Diagnostic] = []
        var needFull = true
        var lastAttempt: ContinuousClock.Instant? = nil
        var lastFull: ContinuousClock.Instant? = nil
        var failures = 0
        var wakeup: (at: ContinuousClock.Instant, task: Task<Void, Never>)? = nil
        /// Forwards change notifications (`.drift`). Started after the first sync has landed: a listener
        /// makes the kernel build a notification for every element of a batch, which would slow the first,
        /// full one (100k+ elements) by seconds.
        var drift: Task<Void, Never>? = nil
        /// When each pending change happened (trigger time or when it was seen).
        var pendingSince: [Date] = []
        /// Objects that failed to decode, by kind and name, with the message; logged once each.
        var invalid: [String: String] = [:]
        /// Warnings already logged; a warning that goes away and comes back is logged again.
        var loggedWarnings: Set<String> = []
        var unavailableLogged: Set<APIResource> = []
        /// Resources whose list or watch is failing now: syncs go on with the last state, but they do not
        /// count as "in step with the API" for health.
        var unreachable: Set<APIResource> = []
        /// The API came back: sync once (even with nothing to change) to confirm it.
        var confirmAfterOutage = false
        /// The set of undecodable objects changed: sync so that diagnostics and metrics say so.
        var reportPending = false
        /// A conntrack cleanup failed: the next sync deletes every stale entry, whatever the change.
        var conntrackStale = false
        /// A list was taken in since the last sync: its transient memory is returned after that sync.
        var listedSinceSync = false

        init(agent: SyncAgent, continuation: AsyncStream<Input>.Continuation, pending: PendingSourceEvents) {
            self.agent = agent
            self.continuation = continuation
            self.pending = pending
        }

        mutating func cancelWakeup() { wakeup?.task.cancel(); wakeup = nil }

        mutating func run(_ inputs: AsyncStream<Input>) async {
            for await input in inputs {
                switch input {
                case .shutdown, .sourceEnded:
                    return
                case .sourceEvents:
                    // Everything that arrived since the last wake-up (also during a sync): one sync for all.
                    for (event, seen, occurrences) in pending.drain() {
                        // In the loop's order (health follows syncs and outages as they happen), and once
                        // for every event an entry stands for (metrics count each restart).
                        for _ in 0..<occurrences { agent.observer.sourceEvent(event) }
                        handle(event, seen: seen)
                    }
                case .driftStopped:
                    agent.logger.warning("change notifications stopped; checking the rules and subscribing again")
                    drift = nil
                    needFull = true
                case .drift(let why):
                    agent.logger.warning("our rules were changed by someone else; repairing", metadata: ["reason": "\(why)"])
                    needFull = true
                case .tick:
                    wakeup = nil
                }
                let now = ContinuousClock.now
                if let due = nextSync(now: now), due <= now {
                    sync()
                }
                schedule()
            }
        }

        mutating func handle(_ event: SourceEvent, seen: Date) {
            switch event {
            case .listed(let kind, let objects, _, let undecodable):
                let affected: Set<ObjectName>
                switch kind {
                case .services: affected = store.replaceServices(objects.services)
                case .endpointSlices: affected = store.replaceEndpointSlices(objects.endpointSlices)
                }
                // What is undecodable now (the list carries it) replaces what was known of this kind:
                // objects fixed meanwhile drop out, also when the event that fixed them was coalesced away.
                var now: [String: String] = [:]
                for report in undecodable {
                    let key = "\(kind.rawValue) \(report.name?.description ?? "?")"
                    if invalid[key] != report.message && now[key] == nil {
                        logInvalid(kind, report.name, report.message)
                    }
                    now[key] = report.message
                }
                invalid = invalid.filter { !$0.key.hasPrefix(kind.rawValue + " ") }.merging(now) { _, new in new }
                reportPending = true
                if !listed.contains(kind) {
                    agent.logger.info("listed", metadata: ["resource": "\(kind.rawValue)",
                                                           "objects": "\(kind == .services ? objects.services.count : objects.endpointSlices.count)"])
                }
                listed.insert(kind)
                listedSinceSync = true
                unavailableLogged.remove(kind)
                if unreachable.remove(kind) != nil && unreachable.isEmpty { confirmAfterOutage = true }
                markDirty(affected, seen: seen, trigger: nil)
            case .changed(let change):
                let affected = store.apply(change)
                var trigger: Date? = nil
                switch change {
                case .service(let s): forgetInvalid(.services, s.id)
                case .serviceDeleted(let n): forgetInvalid(.services, n)
                case .endpointSlice(let e):
                    forgetInvalid(.endpointSlices, e.id)
                    trigger = Self.triggerTime(e)
                case .endpointSliceDeleted(let n): forgetInvalid(.endpointSlices, n)
                }
                unavailableLogged = []
                markDirty(affected, seen: seen, trigger: trigger)
            case .invalidObject(let kind, let name, let message):
                let key = "\(kind.rawValue) \(name?.description ?? "?")"
                if invalid[key] != message { logInvalid(kind, name, message) }
                invalid[key] = message
                if name != nil { reportPending = true }
            case .connected(let kind):
                if unreachable.remove(kind) != nil {
                    agent.logger.info("the API is reachable again", metadata: ["resource": "\(kind.rawValue)"])
                    unavailableLogged.remove(kind)
                    // Nothing may have changed meanwhile: a sync still confirms we are in step again.
                    if unreachable.isEmpty { confirmAfterOutage = true }
                }
            case .watchRestarted(let kind, let reason):
                agent.logger.debug("watch restarted", metadata: ["resource": "\(kind.rawValue)", "reason": "\(reason.rawValue)"])
            case .unavailable(let kind, let error, let retryIn):
                unreachable.insert(kind)
                if !unavailableLogged.contains(kind) {
                    agent.logger.warning("the API is unavailable; the rules stay as they are",
                                         metadata: ["resource": "\(kind.rawValue)", "error": "\(error.description)",
                                                    "retry_in_ms": "\(retryIn.components.seconds * 1000 + retryIn.components.attoseconds / 1_000_000_000_000_000)"])
                    unavailableLogged.insert(kind)
                }
            }
        }

        mutating func forgetInvalid(_ kind: APIResource, _ name: ObjectName) {
            let key = "\(kind.rawValue) \(name)"
            if invalid.removeValue(forKey: key) != nil { reportPending = true }
        }

        func logInvalid(_ kind: APIResource, _ name: ObjectName?, _ message: String) {
            agent.logger.error("left out an object that could not be decoded; its last good copy (if any) stays in use",
                               metadata: ["resource": "\(kind.rawValue)", "object": "\(name?.description ?? "unknown")",
                                          "reason": "\(message)"])
        }

        /// `endpoints.kubernetes.io/last-change-trigger-time`, when the slice carries one.
        static func triggerTime(_ e: EndpointSlice) -> Date? {
            EndpointSliceTrigger.time(of: e)
        }

        mutating func markDirty(_ names: Set<ObjectName>, seen: Date, trigger: Date?) {
            guard !names.isEmpty else { return }
            dirty.formUnion(names)
            // The earliest ones are the longest waits; past this many the rest add nothing to the metric.
            if pendingSince.count < 1024 { pendingSince.append(trigger.map { min($0, seen) } ?? seen) }
        }

        /// When the next sync is due, or nil when there is nothing to do.
        func nextSync(now: ContinuousClock.Instant) -> ContinuousClock.Instant? {
            guard listed.count == APIResource.allCases.count else { return nil }
            var due: ContinuousClock.Instant? = nil
            if !dirty.isEmpty || needFull || installed == nil || confirmAfterOutage || reportPending { due = now }
            if let lastFull {
                let periodic = lastFull + configuration.syncPeriod
                due = due.map { min($0, periodic) } ?? periodic
            }
            guard var next = due else { return nil }
            // At most one sync per minSyncPeriod, and after a failure not before the backoff has passed
            // (the periodic full sync too: a kernel that keeps refusing must not be retried in a loop).
            if let last = lastAttempt {
                next = max(next, last + configuration.minSyncPeriod)
                if failures > 0 { next = max(next, last + retryDelay) }
            }
            return next
        }

        var retryDelay: Duration {
            let base = max(configuration.minSyncPeriod, .milliseconds(100))
            let factor = 1 << min(failures - 1, 16)
            return min(base * factor, configuration.maxRetryDelay)
        }

        mutating func schedule() {
            guard let due = nextSync(now: .now) else { cancelWakeup(); return }
            if let w = wakeup, w.at <= due { return }
            cancelWakeup()
            let continuation = self.continuation
            wakeup = (due, Task {
                try? await Task.sleep(until: due, clock: .continuous)
                if !Task.isCancelled { continuation.yield(.tick) }
            })
        }

        mutating func sync() {
            let start = ContinuousClock.now
            lastAttempt = start
            if let lastFull, start >= lastFull + configuration.syncPeriod { needFull = true }
            let full = needFull || installed == nil
            let kind: SyncReport.Kind = full ? .full : .partial

            // `auto`: decided at the first sync and at each full one; a change of mode is followed.
            if configuration.options.target == .auto && (strategy == nil || full) {
                do {
                    let (picked, why) = try agent.installer.detectTarget(haveEndpointSlices: !store.endpointSlices.isEmpty)
                    if picked != strategy {
                        if strategy != nil {
                            agent.logger.warning("target auto: the node changed; following it",
                                                 metadata: ["from": "\(strategy!.rawValue)", "to": "\(picked.rawValue)", "reason": "\(why)"])
                        } else {
                            agent.logger.info("target auto: picked \(picked.rawValue)", metadata: ["reason": "\(why)"])
                        }
                        strategy = picked
                        planner = nil
                    }
                } catch {
                    return failed(kind, reason: "detection", error.description)
                }
            } else if strategy == nil {
                strategy = configuration.options.target
            }
            if planner == nil {
                var options = configuration.options
                options.target = strategy!
                planner = IncrementalPlanner(settings: configuration.settings, options: options)
                dirty = Set(store.services.keys)
            }
            var resolutionChanged = false
            for name in dirty where planner!.update(name, service: store.services[name], slices: store.slices(of: name)) {
                resolutionChanged = true
            }
            dirty.removeAll()
            // Nothing any Service resolves to changed (a slice update that moved no endpoint, a bookmark-only
            // resync, the check after an outage): no plan to assemble and nothing for the kernel.
            let warnings = invalidDiagnostics()
            let unchanged = !full && !resolutionChanged && installed != nil && warnings == installedWarnings
            let plan = unchanged ? installed! : planner!.plan(extraWarnings: warnings)
            let planned = ContinuousClock.now

            var outcome: InstallOutcome
            var fellBack = false
            do {
                if full {
                    outcome = try agent.installer.replace(with: plan)
                } else if unchanged || installed!.sameRules(as: plan) {
                    outcome = InstallOutcome(changed: false, incremental: true, summary: "no change")
                } else {
                    do {
                        outcome = try agent.installer.update(from: installed!, to: plan)
                    } catch {
                        agent.logger.warning("incremental update refused; replacing the rules in full",
                                             metadata: ["error": "\(error.description)"])
                        fellBack = true
                        outcome = try agent.installer.replace(with: plan)
                    }
                }
            } catch {
                installed = nil
                return failed(kind, reason: error.exitCode == NodeError.noPermissionCode ? "permission" : "kernel", error.description)
            }
            let committed = ContinuousClock.now
            if drift == nil, let notifications = agent.installer.driftNotifications() {
                let continuation = self.continuation
                drift = Task {
                    for await why in notifications { continuation.yield(.drift(why)) }
                    if !Task.isCancelled { continuation.yield(.driftStopped) }
                }
            }
            let previous = installed
            installed = plan
            installedWarnings = warnings
            confirmAfterOutage = false
            reportPending = false
            needFull = false
            failures = 0
            if full || fellBack { lastFull = start }
            var conntrackDeleted = 0
            do {
                if conntrackStale {
                    conntrackDeleted = try agent.installer.cleanConntrack(from: nil, to: plan)
                    conntrackStale = false
                } else if !unchanged {
                    conntrackDeleted = try agent.installer.cleanConntrack(from: previous, to: plan)
                }
            } catch {
                conntrackStale = true
                agent.logger.warning("could not clean up UDP conntrack entries", metadata: ["error": "\(error.description)"])
            }
            let now = Date()
            let latencies = pendingSince.map { Duration.seconds(max(0, now.timeIntervalSince($0))) }
            pendingSince = []
            logWarnings(plan)
            let report = SyncReport(
                kind: kind, duration: ContinuousClock.now - start, changed: outcome.changed, added: outcome.added,
                removed: outcome.removed, fellBackToFull: fellBack, strategy: strategy!,
                mappingsByFamily: plan.mappingsByFamily,
                skippedByReason: plan.skippedByReason(invalidCount: invalid.count),
                services: store.services.count, conntrackDeleted: conntrackDeleted,
                programmingLatencies: latencies, inStepWithAPI: unreachable.isEmpty, summary: outcome.summary, at: now)
            agent.observer.syncSucceeded(report)
            func ms(_ d: Duration) -> String {
                String(format: "%.1f", Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15)
            }
            agent.logger.info("synced", metadata: [
                "kind": "\(kind.rawValue)", "duration_ms": "\(ms(report.duration))",
                "plan_ms": "\(ms(planned - start))", "kernel_ms": "\(ms(committed - planned))",
                "changed": "\(outcome.changed)", "added": "\(outcome.added)", "removed": "\(outcome.removed)",
                "mappings": "\(plan.rules.count)", "services": "\(store.services.count)",
                "skipped": "\(plan.skipped.count)", "conflicts": "\(plan.conflicts.count)",
                "conntrack_deleted": "\(conntrackDeleted)", "target": "\(strategy!.rawValue)",
            ].merging(fellBack ? ["fell_back_to_full": "true"] : [:]) { a, _ in a })
            // After a long sync (a full one, one after a list, an iptables restore of seconds) the trim's
            // cost (the next sync faults its pages in again) is small next to what it gives back; after the
            // short ones of a busy nftables node it is not, and they allocate little.
            if full || fellBack || listedSinceSync || report.duration >= .milliseconds(250) { ProcessMemory.returnFreedPages() }
            listedSinceSync = false
        }

        mutating func failed(_ kind: SyncReport.Kind, reason: String, _ message: String) {
            failures += 1
            needFull = true
            agent.observer.syncFailed(kind: kind, reason: reason, message: message)
            agent.logger.error("sync failed; the kernel keeps its previous rules, retrying",
                               metadata: ["kind": "\(kind.rawValue)", "reason": "\(reason)", "error": "\(message)",
                                          "retry_in_ms": "\(retryDelay.components.seconds * 1000 + retryDelay.components.attoseconds / 1_000_000_000_000_000)"])
        }

        func invalidDiagnostics() -> [Diagnostic] {
            invalid.sorted { $0.key < $1.key }.map { Diagnostic(.error, .invalidObject, "\($0.key): \($0.value)") }
        }

        /// Each warning once while it lasts.
        mutating func logWarnings(_ plan: RulePlan) {
            var current = Set<String>()
            for w in plan.warnings where w.code != .invalidObject {
                current.insert(w.message)
                if !loggedWarnings.contains(w.message) {
                    agent.logger.warning("\(w.message)", metadata: ["code": "\(w.code.rawValue)",
                                                                   "service": "\(w.service?.description ?? "")"])
                }
            }
            for c in plan.conflicts {
                let text = "conflict: \(c)"
                current.insert(text)
                if !loggedWarnings.contains(text) {
                    agent.logger.warning("two services claim one external address; neither is mapped",
                                         metadata: ["reason": "\(text)"])
                }
            }
            loggedWarnings = current
        }
    }
}

extension RulePlan {
    /// Same rules, chains and settings: nothing for the kernel to do.
    func sameRules(as other: RulePlan) -> Bool {
        settings == other.settings && rules == other.rules && targetChains == other.targetChains
    }

    /// Mappings per family ("IPv4", "IPv6"), counted in one pass.
    var mappingsByFamily: [String: Int] {
        var v4 = 0
        rules.withUnsafeBufferPointer { rs in  // in place: no copy of each rule's mapping
            for i in rs.indices where rs[i].mapping.family == .ipv4 { v4 += 1 }
        }
        return ["IPv4": v4, "IPv6": rules.count - v4]
    }

    /// Skipped items counted by reason; every reason is present (0 when none), so a gauge goes back to 0.
    func skippedByReason(invalidCount: Int) -> [SkipReason: Int] {
        var out = Dictionary(uniqueKeysWithValues: SkipReason.allCases.map { ($0, 0) })
        for s in skipped { out[s.code, default: 0] += 1 }
        out[.invalidObject, default: 0] += invalidCount
        return out
    }
}

/// `endpoints.kubernetes.io/last-change-trigger-time` of an EndpointSlice (RFC 3339, with or without
/// fractional seconds), as kube-proxy reads it for its network-programming latency.
enum EndpointSliceTrigger {
    static func time(of slice: EndpointSlice) -> Date? {
        guard let text = slice.lastChangeTriggerTime else { return nil }
        let plain = ISO8601DateFormatter()
        if let d = plain.date(from: text) { return d }
        let fractional = ISO8601DateFormatter()
        fractional.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return fractional.date(from: text)
    }
}
