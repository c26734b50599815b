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
            chains[chain] = installed.rules(chain).map { SavedRuleset.Rule(text: $0) }
        }
    }
}

extension IptablesOwned {
    /// The jumps a plan with mappings installs, as if read from the kernel: one OUTPUT jump into our chain
    /// (in place), and one POSTROUTING jump into the masquerade chain when masquerading. Only for updates
    /// that keep the jumps: their rule text is never used to delete them.
    init(family: IPFamily, jumpsInPlace s: PlanSettings) {
        var nat = SavedRuleset.Table(name: "nat")
        nat.chainOrder = ["OUTPUT", "POSTROUTING"]
        nat.rules["OUTPUT"] = [SavedRuleset.Rule(text: "-j \(s.chain)")]
        nat.rules["POSTROUTING"] = s.masquerade ? [SavedRuleset.Rule(text: "-j \(s.masqueradeChain)")] : []
        var saved = SavedRuleset()
        saved.tables["nat"] = nat
        saved.tableOrder = ["nat"]
        self.init(family: family, saved: saved, settings: s)
        jumpsAssumed = true
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
    /// Nothing is read when both plans have mappings in a family and neither jumps into kube-proxy's chains
    /// (`old` stands for what our chains hold, and the jumps stay as they were); otherwise only OUTPUT and
    /// POSTROUTING (`-S`), to add or remove the jumps; never the whole table. Whatever drifted (someone flushed a chain or deleted a jump) is the
    /// periodic full `apply`'s to repair.
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
        // Each family's restore, and the state a rollback puts it back to (built only if one is needed).
        var steps: [(family: IPFamily, before: () -> IptablesOwned, script: String)] = []
        var changes: [String] = []
        var written = 0, deleted = 0
        var parts: [String] = []
        // With `--target kube-proxy` a full apply leaves out mappings whose KUBE-SVC chain kube-proxy has not
        // made yet, and with them a family's jumps, while the plan (and so `old`) still has the family: its
        // jumps are read, so the update adds them as soon as one of its mappings can go in.
        let jumpsMayBeMissing = old.hasKubeProxyJumps || new.hasKubeProxyJumps
        for family in IPFamily.allCases {
            if !jumpsMayBeMissing && old.hasRules(family) && new.hasRules(family) {
                // The steady state: worked out from the two plans, building only the chains that changed.
                let t = tools(family)
                if !t.installed {
                    throw .unavailable("\(t.saveTool) / \(t.restoreTool) are not installed (package \(IptablesTools.package)); "
                                       + "they are needed for the \(family.rawValue) rules")
                }
                let change = chainUpdate(family: family, from: old, to: new)
                parts.append("\(family.rawValue): \(change.mappings) mapping(s)")
                guard !change.differences.isEmpty else { continue }
                changes += change.differences
                written += change.written.count
                deleted += change.deleted.count
                // What this process installed from `old`: the chains a rollback restores if a later family fails.
                steps.append((family, { IptablesOwned(family: family, installed: IptablesDesired(plan: old, family: family),
                                                      hooks: IptablesOwned(family: family, jumpsInPlace: s)) }, change.script))
                continue
            }
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
            } else if !desired.isEmpty && !jumpsMayBeMissing {
                // Rules before and after: the jumps into our chains were ensured when `old` was installed
                // and the same jumps are wanted now. As kube-proxy does in its partial syncs, they are not
                // read again: with iptables-legacy each `-S` copies the whole nat table out of the kernel
                // (two of them cost more than the restore of a changed chain). A jump someone deleted is
                // put back by the next full apply (every --sync-period).
                hooks = IptablesOwned(family: family, jumpsInPlace: s)
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
            steps.append((family, { owned }, r.script))
        }
        try commit(steps.map { step in (step.before, { () throws(NodeError) in try tools(step.family).restore(step.script) }) }, s)
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

extension IptablesBackend {
    /// What `updateLocked`'s general path does for a family that has mappings before and after, with no
    /// jump into kube-proxy's chains (the jumps are then assumed in place): the same restore script, the same
    /// differences, the same chains written and deleted. Worked out from the plans instead of from the two
    /// complete sets of rules: a target chain is rewritten when its `TargetChain` changed, the dispatch and
    /// masquerade chains when their rules did, and only those are built. At 10k Services one endpoint
    /// changed costs one chain's lines, not 160k lines built twice and compared.
    func chainUpdate(family: IPFamily, from old: RulePlan, to new: RulePlan)
        -> (script: String, written: [String], deleted: [String], differences: [String], mappings: Int) {
        let s = new.settings
        // Chains are compared in place, by index: copying 20k chains (and their strings) per family cost more
        // than the restore of the chain that changed.
        var changedTargets: [Int] = []   // indices into new.targetChains, ascending
        var stale: [Int] = []            // indices into old.targetChains, ascending
        var replaced: [Int] = []         // indices into old.targetChains of the changed chains it has
        old.targetChains.withUnsafeBufferPointer { oc in
            new.targetChains.withUnsafeBufferPointer { nc in
                var kept = [Bool](repeating: false, count: oc.count)
                func compare(_ j: Int, _ i: Int) {
                    kept[j] = true
                    if !TargetChain.same(oc, j, nc, i) { changedTargets.append(i); replaced.append(j) }
                }
                if !Self.pairChainsInOrder(family, oc, nc, pair: compare, unmatched: { changedTargets.append($0) }) {
                    // Not in the planner's order (never, from our planners): pair them by name.
                    changedTargets = []; replaced = []
                    kept = [Bool](repeating: false, count: oc.count)
                    var before: [String: Int] = [:]
                    before.reserveCapacity(oc.count)
                    for i in oc.indices where oc[i].family == family && !oc[i].isKubeProxyJump { before[oc[i].iptablesName] = i }
                    for i in nc.indices where nc[i].family == family && !nc[i].isKubeProxyJump {
                        if let j = before[nc[i].iptablesName] { compare(j, i) } else { changedTargets.append(i) }
                    }
                }
                for i in oc.indices where oc[i].family == family && !oc[i].isKubeProxyJump && !kept[i] { stale.append(i) }
            }
        }
        // The dispatch chain's rules depend on each mapping's address, protocol, port and source ranges, and
        // on its chain's name and comment; the masquerade chain's on the addresses alone.
        let dispatchChanged = !Self.sameDispatch(family, old, new)
        let desired = IptablesDesired(building: IptablesDesired.Builder(plan: new, family: family, only: changedTargets, dispatch: dispatchChanged))
        let installed = IptablesDesired(building: IptablesDesired.Builder(plan: old, family: family,
                                                                         only: (replaced + stale).sorted(),
                                                                         dispatch: dispatchChanged))
        let staleNames = stale.map { old.targetChains[$0].iptablesName }
        // Candidates in the order a full comparison lists them: the dispatch and masquerade chains, then targets.
        // Each is written when its rules differ (a changed TargetChain may still give the same text).
        var candidates = changedTargets.map { new.targetChains[$0].iptablesName }
        if dispatchChanged { candidates.insert(contentsOf: s.masquerade ? [s.chain, s.masqueradeChain] : [s.chain], at: 0) }
        let f = "\(variant.displayName) \(family.rawValue)"
        var write: [String] = []
        var differences: [String] = []
        for chain in candidates {
            let want = desired.rules(chain)
            guard installed.spans[chain] != nil else {
                write.append(chain)
                differences.append("\(f): add chain \(chain) (\(want.count) rule(s))")
                continue
            }
            let have = installed.rules(chain)
            if have == want { continue }
            write.append(chain)
            differences += lineDiff(prefix: "\(f): chain \(chain)", have: have.map { RuleNormalizer.normalize(SavedRuleset.tokenize($0)) },
                                    want: want.map { RuleNormalizer.normalize(SavedRuleset.tokenize($0)) })
        }
        for chain in staleNames {
            differences.append("\(f): remove chain \(chain) (\(installed.ruleCount(chain)) rule(s), not in the plan)")
        }
        guard !write.isEmpty || !staleNames.isEmpty else { return ("", [], [], [], desired.mappings) }
        var script = "*nat\n"
        desired.appendRestoreText(write, to: &script)
        script += (staleNames.map { ":\($0) - [0:0]" } + staleNames.map { "-X \($0)" } + ["COMMIT"]).joined(separator: "\n") + "\n"
        return (script, write, staleNames, differences, desired.mappings)
    }
}

extension IptablesBackend {
    /// Whether `family`'s dispatch rules are the same in both plans: each mapping's address, protocol, port
    /// and source ranges, and its chain's jump target and comment, rule for rule (the masquerade chain follows
    /// from the addresses). Read in place.
    static func sameDispatch(_ family: IPFamily, _ old: RulePlan, _ new: RulePlan) -> Bool {
        old.rules.withUnsafeBufferPointer { or in
            new.rules.withUnsafeBufferPointer { nr in
                old.targetChains.withUnsafeBufferPointer { oc in
                    new.targetChains.withUnsafeBufferPointer { nc in
                        var i = 0, j = 0
                        while true {
                            while i < or.count && or[i].mapping.family != family { i += 1 }
                            while j < nr.count && nr[j].mapping.family != family { j += 1 }
                            if i == or.count || j == nr.count { return i == or.count && j == nr.count }
                            // Field by field: binding a rule's mapping (or calling `==` on a chain) copies it.
                            guard or[i].mapping.externalIP == nr[j].mapping.externalIP, or[i].mapping.protocol == nr[j].mapping.protocol,
                                  or[i].mapping.port == nr[j].mapping.port, or[i].mapping.sourceRanges == nr[j].mapping.sourceRanges
                            else { return false }
                            let (x, y) = (or[i].targetIndex, nr[j].targetIndex)
                            guard oc[x].comment == nc[y].comment else { return false }
                            if oc[x].isKubeProxyJump || nc[y].isKubeProxyJump {
                                guard oc[x].jumpTarget == nc[y].jumpTarget else { return false }
                            } else {
                                guard oc[x].iptablesName == nc[y].iptablesName else { return false }
                            }
                            i += 1; j += 1
                        }
                    }
                }
            }
        }
    }
}

extension TargetChain {
    /// `a[i] == b[j]`, field by field in place: `==` on the elements copies both chains first (a retain and a
    /// release per string and array in them), which for 20k chains per sync cost more than everything else
    /// `chainUpdate` does.
    static func same(_ a: UnsafeBufferPointer<TargetChain>, _ i: Int, _ b: UnsafeBufferPointer<TargetChain>, _ j: Int) -> Bool {
        a[i].iptablesName == b[j].iptablesName && a[i].comment == b[j].comment && a[i].family == b[j].family
            && a[i].protocol == b[j].protocol && a[i].portName == b[j].portName && a[i].service == b[j].service
            && a[i].affinityTimeout == b[j].affinityTimeout && a[i].target.isSame(as: b[j].target)
    }
}

extension IptablesBackend {
    /// Pairs `family`'s own target chains (no kube-proxy jumps) of two plans by walking both in the order
    /// the planners sort them (family, service, port name, protocol), without hashing 20k chain names:
    /// `pair(old index, new index)` for a chain in both, `unmatched(new index)` for one only in `new`, in
    /// `new`'s order. Returns false, having stopped early, if either list is not strictly in that order or
    /// a pair's names differ; the caller then pairs them by name instead.
    static func pairChainsInOrder(_ family: IPFamily, _ oc: UnsafeBufferPointer<TargetChain>, _ nc: UnsafeBufferPointer<TargetChain>,
                                  pair: (Int, Int) -> Void, unmatched: (Int) -> Void) -> Bool {
        func mine(_ c: UnsafeBufferPointer<TargetChain>, _ k: Int) -> Bool { c[k].family == family && !c[k].isKubeProxyJump }
        /// -1, 0, 1 as `a[i]` sorts before, with, or after `b[j]`.
        func order(_ a: UnsafeBufferPointer<TargetChain>, _ i: Int, _ b: UnsafeBufferPointer<TargetChain>, _ j: Int) -> Int {
            if a[i].service != b[j].service { return a[i].service < b[j].service ? -1 : 1 }
            if a[i].portName != b[j].portName { return a[i].portName < b[j].portName ? -1 : 1 }
            if a[i].protocol != b[j].protocol { return a[i].protocol < b[j].protocol ? -1 : 1 }
            return 0
        }
        var i = 0, j = 0, lastOld = -1, lastNew = -1
        while true {
            while i < oc.count && !mine(oc, i) { i += 1 }
            while j < nc.count && !mine(nc, j) { j += 1 }
            if i < oc.count && lastOld >= 0 && order(oc, lastOld, oc, i) >= 0 { return false }
            if j == nc.count {
                // The rest of `old` is stale; it must still be in order, or a chain it holds further on may be
                // one `new` has and was reported as unmatched.
                while i < oc.count {
                    if mine(oc, i) {
                        if lastOld >= 0 && order(oc, lastOld, oc, i) >= 0 { return false }
                        lastOld = i
                    }
                    i += 1
                }
                return true
            }
            if lastNew >= 0 && order(nc, lastNew, nc, j) >= 0 { return false }
            let o = i < oc.count ? order(oc, i, nc, j) : 1
            if o < 0 { lastOld = i; i += 1; continue }           // only in old: stale
            if o > 0 { unmatched(j); lastNew = j; j += 1; continue }
            guard oc[i].iptablesName == nc[j].iptablesName else { return false }
            pair(i, j)
            lastOld = i; lastNew = j; i += 1; j += 1
        }
    }
}
