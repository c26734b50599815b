import NetAddress
import RulePlanning
import RuleRendering
import ServiceResolution

extension IptablesOwned {
    /// What a plan this process applied left in one family: `installed`'s chains and rules, and the live
    /// OUTPUT/POSTROUTING jumps from `hooks` (a read of just those two chains). Nothing else is read, so an
    /// update costs what changed, not what the table holds.
    init(family: IPFamily, installed: IptablesDesired, hooks: IptablesOwned) {
        self = hooks
        self.family = family
        chains = [:]
        chainOrder = installed.chainOrder
        for chain in installed.chainOrder {
            chains[chain] = (installed.rules[chain] ?? []).map { SavedRuleset.Rule(text: $0) }
        }
    }
}

extension IptablesTools {
    /// `iptables -S CHAIN` of the nat table: that chain's rules in iptables-save's spelling, without dumping
    /// the rest of the table (on a node, kube-proxy's chains can hold a hundred thousand rules).
    func listNat(_ chain: String) throws(NodeError) -> [SavedRuleset.Rule] {
        let out = try command.run(name, ["--wait=30", "-t", "nat", "-S", chain], package: Self.package)
        if !out.succeeded {
            throw classify(out, action: "listing nat \(chain) with \(name)", input: nil)
        }
        return SavedRuleset.parse("*nat\n" + out.stdout + "\nCOMMIT\n").table("nat")?.rules(chain) ?? []
    }
}

extension IptablesBackend {
    /// Turns the installed `old` (a plan this process applied) into `new` restoring only the chains whose
    /// rules changed (`iptables-restore --noflush` with just those chains declared), the dispatch chain only
    /// when its rules changed, deleting `HNDNAT-…` chains no rule refers to any more (after the dispatch
    /// rules that jumped to them are gone, in the same restore), and the masquerade chain only when its rules
    /// changed. Nothing changed: no restore at all. Jumps from OUTPUT/POSTROUTING are ensured as `apply` does.
    ///
    /// Only OUTPUT and POSTROUTING are read (`-S`), never the whole table: `old` stands for what our chains
    /// hold. Whatever drifted from it (someone flushed a chain) is the periodic full `apply`'s to repair.
    /// When an incremental restore fails (for example `--target kube-proxy` and kube-proxy has not yet
    /// created the `KUBE-SVC-…` chain of a new service, or different settings), this falls back to a full
    /// `apply(new)`, which reads everything, leaves such mappings out with a warning, and says so.
    func update(from old: RulePlan, to new: RulePlan) throws(NodeError) -> ApplyResult {
        try Capabilities.require(for: "applying \(variant.displayName) rules", context: context)
        return try ApplyLock.withLock { () throws(NodeError) -> ApplyResult in
            guard old.settings == new.settings else {
                return try fullApply(new, because: "the settings changed (--chain, --priority or masquerading)")
            }
            do throws(NodeError) {
                return try updateLocked(from: old, to: new)
            } catch {
                return try fullApply(new, because: "the incremental restore failed: \(error.description)")
            }
        }
    }

    private func fullApply(_ plan: RulePlan, because reason: String) throws(NodeError) -> ApplyResult {
        var result = try applyLocked(plan, dryRun: false)
        result.summary += "; full apply instead of an update: \(reason)"
        return result
    }

    private func updateLocked(from old: RulePlan, to new: RulePlan) throws(NodeError) -> ApplyResult {
        let s = new.settings
        var steps: [(owned: IptablesOwned, script: String)] = []
        var changes: [String] = []
        var written = 0, deleted = 0
        var parts: [String] = []
        for family in IPFamily.allCases {
            let installed = IptablesDesired(plan: old, family: family)
            let desired = IptablesDesired(plan: new, family: family)
            if installed.isEmpty && desired.isEmpty { continue }
            let t = tools(family)
            if !t.installed {
                throw .unavailable("\(t.saveTool) / \(t.restoreTool) are not installed (package \(IptablesTools.package)); "
                                   + "they are needed for the \(family.rawValue) rules")
            }
            let hooks: IptablesOwned
            if installed.isEmpty {
                // A family this plan enters for the first time: read it as apply does (a stale chain of
                // ours from an earlier run would otherwise be flushed without being compared).
                hooks = try owned(family, settings: s, required: true)
            } else {
                var nat = SavedRuleset.Table(name: "nat")
                for chain in ["OUTPUT", "POSTROUTING"] {
                    nat.chainOrder.append(chain)
                    nat.rules[chain] = try t.listNat(chain)
                }
                var saved = SavedRuleset()
                saved.tables["nat"] = nat
                saved.tableOrder = ["nat"]
                hooks = IptablesOwned(family: family, saved: saved, settings: s)
            }
            let owned = installed.isEmpty ? hooks : IptablesOwned(family: family, installed: installed, hooks: hooks)
            let diff = differences(desired, owned, s)
            if !desired.isEmpty { parts.append("\(family.rawValue): \(desired.mappings) mapping(s)") }
            guard !diff.isEmpty else { continue }
            if installed.isEmpty {
                try checkBeforeWriting([(desired, owned)], s, action: "update")
            }
            changes += diff
            let r = restoreScript(desired, owned, s)
            written += r.written.count
            deleted += r.deleted.count
            steps.append((owned, r.script))
        }
        try commit(steps, s)
        var result = ApplyResult(changed: !steps.isEmpty, differences: changes, summary: "")
        result.restoredChains = written
        result.deletedChains = deleted
        result.incremental = true
        result.restoreInputs = steps.map(\.script)
        let state = steps.isEmpty ? "already up to date (no restore)"
            : "updated: \(written) chain(s) restored, \(deleted) deleted in \(steps.count) restore(s)"
        result.summary = "\(variant.displayName) (\(variantReason)) in \(context.place): "
            + (parts.isEmpty ? "no mappings" : parts.joined(separator: "; ")) + "; \(state)"
        return result
    }
}
