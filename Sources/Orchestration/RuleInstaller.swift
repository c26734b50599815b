import NetlinkBackend
import NodeBackend
import RulePlanning
import ServiceResolution

/// What one kernel step did.
public struct InstallOutcome: Sendable, Equatable {
    /// Whether the kernel changed.
    public var changed: Bool
    /// Kernel objects added or deleted (elements, chains, rules): for the sync log line and the bench.
    public var added: Int
    public var removed: Int
    /// True when only the differences were sent; false for a full replacement.
    public var incremental: Bool
    public var summary: String
    public var warnings: [String]

    public init(changed: Bool, added: Int = 0, removed: Int = 0, incremental: Bool, summary: String, warnings: [String] = []) {
        self.changed = changed; self.added = added; self.removed = removed
        self.incremental = incremental; self.summary = summary; self.warnings = warnings
    }
}

/// The last stage of the pipeline, as the agent sees it. `NodeInstaller` is the real one; tests record.
public protocol RuleInstaller: Sendable {
    /// Makes the kernel hold exactly `plan`, comparing with what it holds first (the full pass: first sync,
    /// periodic resync, drift repair, and every one-shot `apply`). All or nothing.
    func replace(with plan: RulePlan) throws(NodeError) -> InstallOutcome
    /// Turns `old` (what this process installed last, and nothing has changed since as far as it knows)
    /// into `new`, touching only what differs. All or nothing; a failure means "do a full replace".
    func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> InstallOutcome
    /// Takes our rules out (the agent's `--cleanup-on-exit`).
    func remove(_ settings: PlanSettings) throws(NodeError) -> Bool
    /// Deletes the UDP conntrack entries the change from `old` to `new` left pointing the wrong way.
    /// Returns how many were deleted.
    func cleanConntrack(from old: RulePlan?, to new: RulePlan) throws(NodeError) -> Int
    /// `--target auto` on this node: what it picks and why.
    func detectTarget(haveEndpointSlices: Bool) throws(NodeError) -> (TargetStrategy, String)
    /// Changes to our rules made by someone else, as they happen (nil: the backend cannot tell).
    func driftNotifications() -> AsyncStream<String>?
}

extension RuleInstaller {
    public func driftNotifications() -> AsyncStream<String>? { nil }
}

/// The installer over `NodeApplier`: nftables over netlink or iptables-restore, in one network namespace.
public struct NodeInstaller: RuleInstaller {
    public let context: NodeContext
    public let backend: Backend
    public let iptablesVariant: IptablesVariant?
    /// nftables: one lasting netlink socket for the agent's updates (nil if it could not be opened yet:
    /// then each update opens its own).
    private let connection: NftablesConnection?
    /// nftables: our table's name, for change notifications.
    private let table: String

    /// `iptablesVariant` nil: the variant is detected once here (kube-proxy's), not at every update.
    public init(context: NodeContext, backend: Backend, iptablesVariant: IptablesVariant?, table: String = "hostnet-dnat") {
        self.context = context; self.backend = backend; self.table = table
        var variant = iptablesVariant
        if backend == .iptables && variant == nil {
            variant = try? NodeApplier(context: context, backend: backend).resolvedIptablesVariant().0
        }
        self.iptablesVariant = variant
        connection = backend == .nftables ? try? NftablesConnection(namespace: context.netns) : nil
    }

    private func applier(_ detection: ProxyDetection? = nil) -> NodeApplier {
        var a = NodeApplier(context: context, backend: backend, iptablesVariant: iptablesVariant, detection: detection)
        a.nftConnection = connection
        return a
    }

    /// nftables announces every committed change: one of our table's that this process did not make (a
    /// table deleted or edited by hand) is reported within milliseconds, so the agent repairs it at once
    /// instead of at its next full sync. nil for iptables (the periodic full sync repairs drift there).
    public func driftNotifications() -> AsyncStream<String>? {
        guard backend == .nftables, let monitor = try? NftablesChangeMonitor(namespace: context.netns, table: table) else { return nil }
        let (stream, continuation) = AsyncStream<String>.makeStream()
        let task = Task {
            do {
                for try await change in monitor.events() {
                    continuation.yield(change.lostNotifications
                        ? "change notifications were lost; checking the table"
                        : "generation \(change.generation) by \(change.processName ?? "?") (pid \(change.processID.map(String.init) ?? "?"))")
                }
            } catch {}
            continuation.finish()
        }
        continuation.onTermination = { _ in monitor.stop(); task.cancel() }
        return stream
    }

    public func replace(with plan: RulePlan) throws(NodeError) -> InstallOutcome {
        let r = try applier().apply(plan, dryRun: false)
        return InstallOutcome(changed: r.changed, added: r.added, removed: r.removed,
                              incremental: false, summary: r.summary, warnings: r.warnings)
    }

    public func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> InstallOutcome {
        let r = try applier().update(from: old, to: new)
        return InstallOutcome(changed: r.changed, added: r.added, removed: r.removed, incremental: r.incremental,
                              summary: r.summary, warnings: r.warnings)
    }

    public func remove(_ settings: PlanSettings) throws(NodeError) -> Bool {
        try applier().remove(settings)
    }

    public func cleanConntrack(from old: RulePlan?, to new: RulePlan) throws(NodeError) -> Int {
        try applier().cleanConntrack(from: old, to: new)
    }

    public func detectTarget(haveEndpointSlices: Bool) throws(NodeError) -> (TargetStrategy, String) {
        try ProxyDetection.detect(in: context).strategy(backend: backend, haveEndpointSlices: haveEndpointSlices)
    }
}
