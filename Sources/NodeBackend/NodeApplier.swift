import NetAddress
import NetlinkBackend
import RulePlanning
import ServiceResolution

/// Installs, compares, shows and removes a plan in a node's kernel, with one backend.
public struct NodeApplier: Sendable {
    public let context: NodeContext
    public let backend: Backend
    /// The variant asked for; nil means "the one kube-proxy uses" (decided on first use, like kube-proxy's
    /// iptables-wrapper does).
    public let iptablesVariant: IptablesVariant?
    /// What `--target auto` already saw on this node; its variant is used when none is forced, so the
    /// target it picked (e.g. kube-proxy's chains in iptables-nft) and the variant written to agree.
    public let detection: ProxyDetection?
    /// A lasting netlink socket for nftables updates (the agent's); nil: one socket per call.
    public var nftConnection: NftablesConnection?

    public init(context: NodeContext, backend: Backend, iptablesVariant: IptablesVariant? = nil) {
        self.init(context: context, backend: backend, iptablesVariant: iptablesVariant, detection: nil)
    }

    public init(context: NodeContext, backend: Backend, iptablesVariant: IptablesVariant?, detection: ProxyDetection?) {
        self.context = context; self.backend = backend; self.iptablesVariant = iptablesVariant; self.detection = detection
    }

    /// The variant the iptables backend writes to, and why: `--iptables`, else the one detection found
    /// kube-proxy's/kubelet's chains in, else `IptablesVariant.detect`.
    public func resolvedIptablesVariant() throws(NodeError) -> (IptablesVariant, reason: String) {
        if let v = iptablesVariant { return (v, "forced with --iptables \(v.rawValue)") }
        if let d = detection, let v = d.iptablesVariant {
            let facts = d.evidence.filter { $0.contains("KUBE-") }
            return (v, "kube-proxy/kubelet chains are in \(v.displayName)"
                    + (facts.isEmpty ? "" : ": " + facts.joined(separator: ", ")))
        }
        return try IptablesVariant.detect(in: context)
    }

    private func iptables() throws(NodeError) -> IptablesBackend {
        let (v, reason) = try resolvedIptablesVariant()
        return IptablesBackend(context: context, variant: v, variantReason: reason)
    }

    private var nftables: NftablesBackend { NftablesBackend(context: context, connection: nftConnection) }

    /// Makes the kernel hold exactly `plan` (our table, or our chains and jumps). With `dryRun` it only
    /// computes the differences and touches nothing. Applying the same plan twice changes nothing the
    /// second time.
    public func apply(_ plan: RulePlan, dryRun: Bool) throws(NodeError) -> ApplyResult {
        switch backend {
        case .nftables: return try nftables.apply(plan, dryRun: dryRun)
        case .iptables: return try iptables().apply(plan, dryRun: dryRun)
        }
    }

    /// Turns the installed `old` (the plan this process applied last) into `new`, rewriting only what
    /// changed. iptables: one `--noflush` restore per family with just the changed chains (see
    /// `IptablesBackend.update`). nftables: a full apply for now. A periodic full `apply` still repairs drift.
    public func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> ApplyResult {
        switch backend {
        case .nftables: return try nftables.update(from: old, to: new)
        case .iptables: return try iptables().update(from: old, to: new)
        }
    }

    /// Deletes the UDP conntrack entries that the change from `old` to `new` left pointing at an endpoint
    /// that no longer serves (or at the load balancer, for a mapping that just appeared); with no `old` (an
    /// agent that just started), every UDP entry to one of `new`'s addresses whose reply comes from anything
    /// but a current destination. Call it after the new rules are committed. Returns how many were deleted.
    /// Either backend: conntrack is shared by iptables and nftables.
    public func cleanConntrack(from old: RulePlan?, to new: RulePlan) throws(NodeError) -> Int {
        let table = ConntrackTable(namespace: context.netns)
        do throws(NetlinkError) {
            if let old { return try table.cleanUp(from: old, to: new).deleted }
            return try table.deleteStale(for: new).deleted
        } catch {
            throw NodeError(netlink: error, action: "deleting stale UDP conntrack entries in \(context.place)")
        }
    }

    /// Differences between the kernel and `plan`, one line each; empty when the kernel matches the plan.
    public func diff(_ plan: RulePlan) throws(NodeError) -> [String] {
        switch backend {
        case .nftables: return try nftables.diff(plan)
        case .iptables: return try iptables().diff(plan)
        }
    }

    /// What the kernel holds now: netlink read-back for nftables, `iptables-save` for iptables.
    public func status(_ settings: PlanSettings) throws(NodeError) -> NodeStatus {
        switch backend {
        case .nftables: return try nftables.status(settings)
        case .iptables: return try iptables().status(settings)
        }
    }

    /// Takes out our table (nftables) or our chains and their jumps (iptables), nothing else. Returns
    /// whether anything was there.
    public func remove(_ settings: PlanSettings) throws(NodeError) -> Bool {
        switch backend {
        case .nftables: return try nftables.remove(settings)
        case .iptables: return try iptables().remove(settings)
        }
    }
}

/// The nftables backend: everything goes through `NftablesNetlink` (one atomic batch, no nft process).
struct NftablesBackend: Sendable {
    let context: NodeContext
    var connection: NftablesConnection? = nil
    var netlink: NftablesNetlink { NftablesNetlink(namespace: context.netns) }

    private func refuseKubeProxyTarget(_ plan: RulePlan) throws(NodeError) {
        if let why = plan.nftablesRefusal { throw .refused(why) }
    }

    private func read(_ table: String, action: String) throws(NodeError) -> InstalledRuleset? {
        do { return try netlink.read(table: table) } catch { throw NodeError(netlink: error, action: action) }
    }

    func differences(_ plan: RulePlan) throws(NodeError) -> [String] {
        let installed = try read(plan.settings.table, action: "reading table inet \(plan.settings.table) in \(context.place)")
        return InstalledRuleset.differences(installed: installed, expected: NftablesNetlink.expected(plan))
    }

    func apply(_ plan: RulePlan, dryRun: Bool) throws(NodeError) -> ApplyResult {
        try refuseKubeProxyTarget(plan)
        try Capabilities.require(for: "applying table inet \(plan.settings.table)", context: context)
        // Another tool's table of that name is refused before anything, dry run included (netlink.apply
        // checks again right before its batch).
        do { try netlink.requireOwnership(table: plan.settings.table) } catch {
            throw NodeError(netlink: error, action: "applying table inet \(plan.settings.table) in \(context.place)")
        }
        let before = try differences(plan)
        var note = ""
        if !dryRun && !before.isEmpty {
            let report: ApplyReport
            do { report = try netlink.apply(plan) } catch {
                throw NodeError(netlink: error, action: "applying table inet \(plan.settings.table) in \(context.place)")
            }
            // No read-back afterwards: the batch is one transaction and every message was acknowledged, and
            // reading ~100k elements back would cost more than the apply itself (`diff` does that on demand).
            note = "; one batch of \(report.messages) netlink message(s), \(report.bytes) bytes, "
                + "\(Int((report.seconds * 1000).rounded())) ms"
        }
        let state = before.isEmpty ? "already up to date" : "\(dryRun ? "would change" : "changed") \(before.count) thing(s)"
        let summary = "nftables table inet \(plan.settings.table) in \(context.place): \(plan.rules.count) mapping(s), "
            + "\(plan.nftPickChains.count) pick chain(s), output priority \(plan.settings.priority); \(state)\(note)"
        return ApplyResult(changed: !before.isEmpty, differences: before, summary: summary)
    }

    /// One netlink batch with exactly the elements and pick chains that differ between `old` (installed by
    /// this process) and `new` (`NftablesNetlink.update`); no read-back and no ownership lookup first: the
    /// table is ours since we replaced it. A table changed behind our back makes the kernel refuse the batch
    /// (nothing committed), and the caller does a full `apply`.
    func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> ApplyResult {
        try refuseKubeProxyTarget(new)
        let report: ApplyReport
        do {
            if let connection { report = try connection.update(from: old, to: new) } else { report = try netlink.update(from: old, to: new) }
        } catch {
            throw NodeError(netlink: error, action: "updating table inet \(new.settings.table) in \(context.place)")
        }
        var what = "replaced in full (a change an update cannot make in place: table, priority or masquerading, "
            + "the last source range removed, or an affinity timeout)"
        if report.incremental {
            what = "\(report.elementsAdded) element(s) added, \(report.elementsDeleted) deleted, \(report.chainsAdded) chain(s) added, \(report.chainsDeleted) deleted"
            if report.setsAdded + report.setsDeleted > 0 { what += ", \(report.setsAdded) affinity set(s) added, \(report.setsDeleted) deleted" }
            if report.chainsRewritten > 0 { what += ", \(report.chainsRewritten) affinity chain(s) rewritten" }
        }
        var result = ApplyResult(changed: report.objectsChanged > 0 || !report.incremental, differences: [],
                                 summary: "nftables table inet \(new.settings.table) in \(context.place): \(new.rules.count) mapping(s); \(what); "
                                    + "\(report.messages) netlink message(s), \(report.bytes) bytes")
        result.added = report.elementsAdded + report.chainsAdded + report.setsAdded + report.chainsRewritten
        result.removed = report.elementsDeleted + report.chainsDeleted + report.setsDeleted
        result.incremental = report.incremental
        return result
    }

    func diff(_ plan: RulePlan) throws(NodeError) -> [String] {
        try refuseKubeProxyTarget(plan)
        try Capabilities.require(for: "reading table inet \(plan.settings.table)", context: context)
        return try differences(plan)
    }

    func status(_ s: PlanSettings) throws(NodeError) -> NodeStatus {
        try Capabilities.require(for: "reading table inet \(s.table)", context: context)
        var status = NodeStatus(backend: .nftables, netns: context.netns?.path)
        guard let installed = try read(s.table, action: "reading table inet \(s.table) in \(context.place)") else {
            status.notes.append("no table inet \(s.table)")
            return status
        }
        status.installed = true
        if let p = installed.outputPriority {
            status.hooks.append("table inet \(s.table) chain output: type nat hook output priority \(p)")
        } else {
            status.notes.append("table inet \(s.table) has no output chain: nothing is translated")
        }
        if let p = installed.masqueradePriority {
            status.hooks.append("table inet \(s.table) chain postrouting: type nat hook postrouting priority \(p) (masquerade)")
        }
        status.mappings = installed.mappings.map { m in
            StatusMapping(family: m.externalIP.family, externalIP: m.externalIP.description, protocol: m.protocol.lowercased,
                          port: m.port, target: m.chain, destinations: m.destinations.map(\.description), comment: m.comment,
                          sourceRanges: m.sourceRanges.map(\.description), affinityTimeout: m.affinityTimeout)
        }
        status.notes += installed.anomalies
        // The mappings above already are the table's content; only the masquerade set is left to show.
        if !installed.masqueradeAddresses.isEmpty {
            status.hooks.append("masquerade: \(installed.masqueradeAddresses.map(\.description).joined(separator: ", "))")
        }
        return status
    }

    func remove(_ s: PlanSettings) throws(NodeError) -> Bool {
        try Capabilities.require(for: "removing table inet \(s.table)", context: context)
        do { return try netlink.remove(table: s.table) } catch {
            throw NodeError(netlink: error, action: "removing table inet \(s.table) in \(context.place)")
        }
    }
}
