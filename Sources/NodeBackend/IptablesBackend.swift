import NetAddress
import RulePlanning
import RuleRendering
import ServiceResolution

/// Our objects in one family's nat table, as iptables-save shows them.
struct IptablesOwned: Sendable {
    typealias Rule = SavedRuleset.Rule
    struct Jump: Sendable { var index: Int; var rule: Rule }

    var family: IPFamily
    /// nil when the dump has no nat table at all (legacy creates it on first use).
    var nat: SavedRuleset.Table?
    /// Our chains and their rules: the main and masquerade chains, and the `HNDNAT-*` chains that only our
    /// main chain (or nothing) refers to. Another instance's `HNDNAT-*` chains (`--chain` differs) are
    /// referred to by its own main chain and are left alone.
    var chains: [String: [Rule]] = [:]
    var chainOrder: [String] = []
    var outputJumps: [Jump] = []
    var postroutingJumps: [Jump] = []
    /// Position of kube-proxy's `-j KUBE-SERVICES` in nat OUTPUT.
    var kubeServicesIndex: Int?
    /// The jumps were not read but assumed in place (`init(family:jumpsInPlace:)`): their positions are
    /// unknown, so a rollback leaves them as they are (the update did not touch them either).
    var jumpsAssumed = false

    var isEmpty: Bool { chains.isEmpty && outputJumps.isEmpty && postroutingJumps.isEmpty }

    init(family: IPFamily, saved: SavedRuleset, settings: PlanSettings) {
        self.family = family
        nat = saved.table("nat")
        guard let nat else { return }
        let refs = nat.referrers()
        let ours: Set<String> = [settings.chain, settings.masqueradeChain]
        for chain in nat.chainOrder {
            let isOurs: Bool
            if ours.contains(chain) {
                isOurs = true
            } else if chain.hasPrefix("HNDNAT-") {
                isOurs = (refs[chain] ?? []).isSubset(of: ours)
            } else {
                isOurs = false
            }
            if isOurs { chains[chain] = nat.rules(chain); chainOrder.append(chain) }
        }
        for (i, r) in nat.rules("OUTPUT").enumerated() {
            if r.target == settings.chain { outputJumps.append(Jump(index: i, rule: r)) }
            if r.target == "KUBE-SERVICES" && kubeServicesIndex == nil { kubeServicesIndex = i }
        }
        for (i, r) in nat.rules("POSTROUTING").enumerated() where r.target == settings.masqueradeChain {
            postroutingJumps.append(Jump(index: i, rule: r))
        }
    }

    /// The OUTPUT jump is there exactly once, on the requested side of kube-proxy's.
    func outputJumpInPlace(_ s: PlanSettings) -> Bool {
        guard outputJumps.count == 1 else { return false }
        guard let k = kubeServicesIndex else { return true }
        return s.runsBeforeKubeProxy ? outputJumps[0].index < k : outputJumps[0].index > k
    }
}

/// iptables / ip6tables through `*-restore --noflush`, into the variant kube-proxy uses.
struct IptablesBackend: Sendable {
    let context: NodeContext
    let variant: IptablesVariant
    let variantReason: String

    func tools(_ family: IPFamily) -> IptablesTools {
        IptablesTools(variant: variant, family: family, command: NamespacedCommand(context: context))
    }

    /// Reads one family; a family whose tools are missing reads as "nothing there" unless `required`.
    func owned(_ family: IPFamily, settings: PlanSettings, required: Bool) throws(NodeError) -> IptablesOwned {
        let t = tools(family)
        if !t.installed {
            if required {
                throw .unavailable("\(t.saveTool) / \(t.restoreTool) are not installed (package \(IptablesTools.package)); "
                                   + "they are needed for the \(family.rawValue) rules")
            }
            return IptablesOwned(family: family, saved: SavedRuleset(), settings: settings)
        }
        return IptablesOwned(family: family, saved: try t.save(), settings: settings)
    }

    // MARK: differences

    /// Whether a chain in the kernel holds exactly what `desired` wants: the rules byte for byte (both sides
    /// are in iptables-save's spelling), else, for a chain that differs as text, after normalising both sides
    /// (another iptables version may spell a rule differently; only such chains pay for it).
    func sameRules(_ desired: IptablesDesired, _ chain: String, _ have: [SavedRuleset.Rule]) -> Bool {
        if desired.holdsSameRules(chain, as: have) { return true }
        let want = desired.rules(chain)
        guard want.count == have.count else { return false }
        return zip(want, have).allSatisfy { w, h in
            w == h.text || RuleNormalizer.normalize(SavedRuleset.tokenize(w)) == RuleNormalizer.normalize(h)
        }
    }

    /// Our chains whose rules must be (re)written, and our chains the plan no longer has.
    func chainChanges(_ desired: IptablesDesired, _ owned: IptablesOwned) -> (write: [String], stale: [String]) {
        var write: [String] = []
        if !desired.isEmpty {
            for chain in desired.chainOrder {
                guard let have = owned.chains[chain], sameRules(desired, chain, have) else { write.append(chain); continue }
            }
        }
        let wanted = desired.isEmpty ? [] : Set(desired.chainOrder)
        return (write, owned.chainOrder.filter { !wanted.contains($0) })
    }

    func differences(_ desired: IptablesDesired, _ owned: IptablesOwned, _ s: PlanSettings) -> [String] {
        let f = "\(variant.displayName) \(desired.family.rawValue)"
        var out: [String] = []
        let (write, stale) = chainChanges(desired, owned)
        for chain in write {
            guard let have = owned.chains[chain] else {
                out.append("\(f): add chain \(chain) (\(desired.ruleCount(chain)) rule(s))")
                continue
            }
            let want = desired.rules(chain)
            out += lineDiff(prefix: "\(f): chain \(chain)", have: have.map(RuleNormalizer.normalize),
                            want: want.map { RuleNormalizer.normalize(SavedRuleset.tokenize($0)) })
        }
        for chain in stale {
            out.append("\(f): remove chain \(chain) (\(owned.chains[chain]?.count ?? 0) rule(s), not in the plan)")
        }
        out += jumpDifferences(desired, owned, s)
        return out
    }

    private func jumpDifferences(_ desired: IptablesDesired, _ owned: IptablesOwned, _ s: PlanSettings) -> [String] {
        let f = "\(variant.displayName) \(desired.family.rawValue)"
        var out: [String] = []
        let where_ = s.runsBeforeKubeProxy ? "before" : "after"
        if desired.isEmpty {
            if !owned.outputJumps.isEmpty { out.append("\(f): remove \(owned.outputJumps.count) jump(s) OUTPUT -> \(s.chain)") }
        } else if !owned.outputJumpInPlace(s) {
            if owned.outputJumps.isEmpty {
                out.append("\(f): add jump OUTPUT -> \(s.chain) (\(where_) kube-proxy's KUBE-SERVICES)")
            } else if owned.outputJumps.count > 1 {
                out.append("\(f): OUTPUT jumps to \(s.chain) \(owned.outputJumps.count) times; keep exactly one")
            } else {
                out.append("\(f): move jump OUTPUT -> \(s.chain) \(where_) kube-proxy's KUBE-SERVICES (priority \(s.priority))")
            }
        }
        let wantMasq = !desired.isEmpty && s.masquerade ? 1 : 0
        if owned.postroutingJumps.count != wantMasq {
            out.append(wantMasq == 1 && owned.postroutingJumps.isEmpty
                       ? "\(f): add jump POSTROUTING -> \(s.masqueradeChain)"
                       : "\(f): POSTROUTING jumps to \(s.masqueradeChain) \(owned.postroutingJumps.count) time(s); want \(wantMasq)")
        }
        return out
    }

    /// Rules only in the kernel (`-`) and only in the plan (`+`), as multisets: linear for big chains.
    func lineDiff(prefix: String, have: [String], want: [String]) -> [String] {
        var count: [String: Int] = [:]
        for w in want { count[w, default: 0] += 1 }
        var removed: [String] = []
        for h in have {
            if let c = count[h], c > 0 { count[h] = c - 1 } else { removed.append(h) }
        }
        var added: [String] = []
        for w in want where (count[w] ?? 0) > 0 { added.append(w); count[w]! -= 1 }
        var out = removed.map { "\(prefix): - \($0)" } + added.map { "\(prefix): + \($0)" }
        if out.isEmpty { out.append("\(prefix): same rules in a different order") }
        return out
    }

    // MARK: restore scripts

    /// One restore file: the whole change for a family commits at once (legacy replaces the table in one
    /// call, nft sends one transaction), so the kernel never holds a half-updated set of our chains.
    func applyScript(_ desired: IptablesDesired, _ owned: IptablesOwned, _ s: PlanSettings) -> String {
        restoreScript(desired, owned, s).script
    }

    /// The restore file and what it does: only the chains whose rules differ are declared (declaring
    /// flushes) and refilled, as kube-proxy does; chains the plan no longer has are flushed and then deleted,
    /// after the rules that jumped to them are gone; the OUTPUT/POSTROUTING jumps are fixed when needed.
    func restoreScript(_ desired: IptablesDesired, _ owned: IptablesOwned, _ s: PlanSettings)
        -> (script: String, written: [String], deleted: [String]) {
        if desired.isEmpty { return (removeScript(owned, s), [], owned.chainOrder) }
        var lines = ["*nat"]
        let fixOutput = !owned.outputJumpInPlace(s)
        if fixOutput { lines += owned.outputJumps.map { "-D OUTPUT \($0.rule.text)" } }
        let wantMasq = s.masquerade
        if !wantMasq { lines += owned.postroutingJumps.map { "-D POSTROUTING \($0.rule.text)" } }
        else if owned.postroutingJumps.count > 1 { lines += owned.postroutingJumps.dropFirst().map { "-D POSTROUTING \($0.rule.text)" } }
        let (write, stale) = chainChanges(desired, owned)
        var script = lines.joined(separator: "\n") + "\n"
        // Declaring a chain creates it or flushes it; only our chains are declared.
        desired.appendRestoreText(write, to: &script)
        // Stale chains: flushed by declaring them, deleted once nothing refers to them any more.
        var tail = stale.map { ":\($0) - [0:0]" }
        tail += stale.map { "-X \($0)" }
        tail += IptablesRenderer.jumpLines(s, output: fixOutput, postrouting: wantMasq && owned.postroutingJumps.isEmpty)
        tail.append("COMMIT")
        script += tail.joined(separator: "\n") + "\n"
        return (script, write, stale)
    }

    /// Jumps out first, then flush and delete our chains: nothing else is named, so nothing else changes.
    func removeScript(_ owned: IptablesOwned, _ s: PlanSettings) -> String {
        var lines = ["*nat"]
        lines += owned.outputJumps.map { "-D OUTPUT \($0.rule.text)" }
        lines += owned.postroutingJumps.map { "-D POSTROUTING \($0.rule.text)" }
        lines += owned.chainOrder.map { ":\($0) - [0:0]" }
        lines += owned.chainOrder.map { "-X \($0)" }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }

    /// Puts one family back the way `before` saw it: our current jumps and chains out, the old chains
    /// with their old rules in, the old jumps at their old positions. Nothing else is named.
    func rollbackScript(before: IptablesOwned, now: IptablesOwned) -> String {
        var lines = ["*nat"]
        let jumps = !before.jumpsAssumed
        if jumps {
            lines += now.outputJumps.map { "-D OUTPUT \($0.rule.text)" }
            lines += now.postroutingJumps.map { "-D POSTROUTING \($0.rule.text)" }
        }
        let old = Set(before.chainOrder)
        for chain in before.chainOrder + now.chainOrder.filter({ !old.contains($0) }) { lines.append(":\(chain) - [0:0]") }
        for chain in before.chainOrder {
            lines += (before.chains[chain] ?? []).map { "-A \(chain) \($0.text)" }
        }
        lines += now.chainOrder.filter { !old.contains($0) }.map { "-X \($0)" }
        if jumps {
            lines += before.outputJumps.sorted { $0.index < $1.index }.map { "-I OUTPUT \($0.index + 1) \($0.rule.text)" }
            lines += before.postroutingJumps.sorted { $0.index < $1.index }.map { "-I POSTROUTING \($0.index + 1) \($0.rule.text)" }
        }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
    }

    // MARK: checks before anything is written

    /// Our chains the scripts delete (`-X`) in one family: the stale ones, or all of them when the family
    /// gets no mappings (or on remove, `desired == nil`).
    func deletedChains(_ desired: IptablesDesired?, _ owned: IptablesOwned) -> Set<String> {
        guard let desired, !desired.isEmpty else { return Set(owned.chainOrder) }
        return Set(owned.chainOrder).subtracting(desired.chainOrder)
    }

    /// Rules outside our chains that jump to a chain we are about to delete (our own OUTPUT/POSTROUTING
    /// jumps excluded: the scripts delete those first). `-X` would fail on them.
    func foreignJumps(into deleted: Set<String>, _ owned: IptablesOwned, _ s: PlanSettings) -> [String] {
        guard !deleted.isEmpty, let nat = owned.nat else { return [] }
        let flushed = Set(owned.chainOrder)
        var out: [String] = []
        for chain in nat.chainOrder where !flushed.contains(chain) {
            for r in nat.rules(chain) {
                guard let t = r.target, deleted.contains(t) else { continue }
                if chain == "OUTPUT" && t == s.chain { continue }
                if chain == "POSTROUTING" && t == s.masqueradeChain { continue }
                out.append("chain \(chain): -A \(chain) \(r.text)")
            }
        }
        return out
    }

    /// Rules in the main or masquerade chain that we never write: the chain is someone else's.
    func foreignRules(_ owned: IptablesOwned, _ s: PlanSettings) -> [String] {
        var out: [String] = []
        for r in owned.chains[s.chain] ?? [] {
            let t = r.target ?? ""
            guard t.hasPrefix("HNDNAT-") || t.hasPrefix("KUBE-SVC-") else { out.append("-A \(s.chain) \(r.text)"); continue }
            let tokens = r.tokens
            let ours = tokens.contains("-d") && tokens.contains("--dport") && tokens.contains("--comment")
            if !ours { out.append("-A \(s.chain) \(r.text)") }
        }
        for r in owned.chains[s.masqueradeChain] ?? [] {
            guard r.target == "MASQUERADE" else { out.append("-A \(s.masqueradeChain) \(r.text)"); continue }
            let tokens = r.tokens
            let ours = tokens.contains("--ctorigdst") && tokens.count <= 10
            if !ours { out.append("-A \(s.masqueradeChain) \(r.text)") }
        }
        return out
    }

    /// Refuses before the first restore, looking at both families: a `--chain` (or its -MASQ chain) that
    /// holds rules we did not write (exit 64), or other rules jumping to a chain we would delete (exit 1).
    /// The restores are per family, so a failure found only at the second one would leave the first changed.
    func checkBeforeWriting(_ families: [(desired: IptablesDesired?, owned: IptablesOwned)], _ s: PlanSettings, action: String) throws(NodeError) {
        for (_, owned) in families {
            let foreign = foreignRules(owned, s)
            guard !foreign.isEmpty else { continue }
            let list = foreign.prefix(3).joined(separator: "\n  ") + (foreign.count > 3 ? "\n  … and \(foreign.count - 3) more" : "")
            throw NodeError(exitCode: NodeError.usageCode, description:
                "--chain \(s.chain): the \(variant.displayName) \(owned.family.rawValue) nat table of \(context.place) already has "
                + "this chain (or \(s.masqueradeChain)) with rules hostnet-dnat did not write:\n  \(list)\n"
                + "it belongs to someone else, and \(action) would flush it; choose another --chain (nothing was changed)")
        }
        var problems: [String] = []
        for (desired, owned) in families {
            let deleted = deletedChains(desired, owned)
            for j in foreignJumps(into: deleted, owned, s) {
                problems.append("\(variant.displayName) \(owned.family.rawValue) nat \(j)")
            }
        }
        guard !problems.isEmpty else { return }
        throw .refused("cannot \(action) in \(context.place): it deletes chains that other rules jump to, and the kernel "
                       + "refuses to delete a chain that is still referenced:\n  " + problems.joined(separator: "\n  ")
                       + "\ndelete or change those rules first (nothing was changed in either family)")
    }

    // MARK: operations

    typealias Change = (desired: IptablesDesired, owned: IptablesOwned, differences: [String])

    /// `read`: both families as already read (in `IPFamily.allCases` order), or nil to read them here.
    func plannedChanges(_ plan: RulePlan, owned read: [IptablesOwned]? = nil) throws(NodeError) -> [Change] {
        var out: [Change] = []
        var missingAll: [(chain: String, comment: String, family: IPFamily)] = []
        var kubeTotal = 0
        for (i, family) in IPFamily.allCases.enumerated() {
            var desired = IptablesDesired(plan: plan, family: family)
            let owned: IptablesOwned
            if let read { owned = read[i] } else { owned = try self.owned(family, settings: plan.settings, required: !desired.isEmpty) }
            if !desired.isEmpty && !desired.kubeChains.isEmpty {
                kubeTotal += desired.kubeChains.count
                let missing = desired.kubeChains.filter { owned.nat?.hasChain($0.chain) != true }
                missingAll += missing.map { ($0.chain, $0.comment, family) }
                if !missing.isEmpty {
                    desired = IptablesDesired(plan: plan, family: family, missingKubeChains: Set(missing.map(\.chain)),
                                              place: " in the \(variant.displayName) \(family.rawValue) nat table")
                }
            }
            out.append((desired, owned, differences(desired, owned, plan.settings)))
        }
        // Some chains missing: kube-proxy creates none for services without endpoints (left out above).
        // All of them missing: kube-proxy does not run in this variant, and nothing would work.
        if kubeTotal > 0 && missingAll.count == kubeTotal {
            let list = missingAll.prefix(5).map { "\($0.chain) (\($0.comment))" }.joined(separator: ", ")
            let more = missingAll.count > 5 ? " and \(missingAll.count - 5) more" : ""
            throw .refused("--target kube-proxy: none of kube-proxy's chains exist: \(list)\(more) does not exist in the "
                           + "\(variant.displayName) nat table of \(context.place). kube-proxy is not in iptables mode here, "
                           + "writes to the other variant (try --iptables \(variant == .nft ? "legacy" : "nft")), or has no such "
                           + "service port; use --target endpoints instead")
        }
        return out
    }

    func apply(_ plan: RulePlan, dryRun: Bool) throws(NodeError) -> ApplyResult {
        try Capabilities.require(for: "applying \(variant.displayName) rules", context: context)
        // A dry run only reads: no lock needed (and none taken, so it works where /run is read-only).
        if dryRun { return try applyLocked(plan, dryRun: true) }
        return try ApplyLock.withLock { () throws(NodeError) -> ApplyResult in try applyLocked(plan, dryRun: false) }
    }

    func applyLocked(_ plan: RulePlan, dryRun: Bool) throws(NodeError) -> ApplyResult {
        var owned: [IptablesOwned]? = nil
        if !dryRun && !plan.hasKubeProxyJumps {
            let read = try IPFamily.allCases.map { (family) throws(NodeError) -> IptablesOwned in
                try self.owned(family, settings: plan.settings, required: plan.hasRules(family))
            }
            if read.allSatisfy(\.isEmpty) { return try applyFresh(plan, owned: read) }
            owned = read
        }
        let changes = try plannedChanges(plan, owned: owned)
        try checkBeforeWriting(changes.map { ($0.desired, $0.owned) }, plan.settings, action: "apply")
        let differences = changes.flatMap(\.differences)
        let warnings = changes.flatMap(\.desired.skipped)
        var result = ApplyResult(changed: !differences.isEmpty, differences: differences,
                                 summary: summary(plan, changes: changes, dryRun: dryRun), warnings: warnings)
        if !dryRun {
            var steps: [(owned: IptablesOwned, script: String)] = []
            for change in changes where !change.differences.isEmpty {
                let r = restoreScript(change.desired, change.owned, plan.settings)
                steps.append((change.owned, r.script))
                result.restoredChains += r.written.count
                result.deletedChains += r.deleted.count
            }
            // No read-back afterwards: each restore is one commit (legacy replaces the table, nft sends one
            // transaction) and its exit status is checked; dumping the table again cost as much as the
            // restore itself. `diff` compares on demand, and a second apply finds any difference.
            try commit(steps, plan.settings)
            result.restoreInputs = steps.map(\.script)
        }
        return result
    }

    /// A first install: none of our chains or jumps in either family, and no jump into kube-proxy's chains
    /// (whose absence changes what is written). Nothing to compare, so the restore starts at once and reads
    /// the target chains while the rest are still being written: declared batch by batch, the dispatch chain
    /// (which jumps to all of them) and the jumps into it last, one commit per family as in `commit`. At 10k
    /// Services this hides building the rules (~0.1 s) behind the restore's own parsing. The price: a legacy
    /// restore holds `xtables.lock` from `*nat` on, so for those ~0.1 s as well.
    private func applyFresh(_ plan: RulePlan, owned: [IptablesOwned]) throws(NodeError) -> ApplyResult {
        let s = plan.settings
        let families = zip(IPFamily.allCases, owned).filter { plan.hasRules($0.0) }
        var installed: [(desired: IptablesDesired, owned: IptablesOwned, input: [UInt8])] = []
        try commit(families.map { family, before in
            ({ before }, { () throws(NodeError) in
                let (desired, input) = try streamRestore(plan, family: family)
                installed.append((desired, before, input))
            })
        }, s)
        // What was done, worked out once every family is in (not between the restores).
        let changes: [Change] = installed.map { ($0.desired, $0.owned, self.differences($0.desired, $0.owned, s)) }
        let all = changes.flatMap(\.differences)
        var result = ApplyResult(changed: !all.isEmpty, differences: all,
                                 summary: summary(plan, changes: changes, dryRun: false), warnings: [])
        result.restoredChains = changes.reduce(0) { $0 + $1.desired.chainOrder.count }
        result.restoreInputs = installed.map { String(decoding: $0.input, as: UTF8.self) }
        return result
    }

    /// One family's restore, its input written while the restore reads it: `*nat` and the dispatch and
    /// masquerade chains' declarations, then the target chains batch by batch (declared, then filled), then
    /// the dispatch and masquerade rules, the jumps into them, and `COMMIT`. Returns what was installed and
    /// the input as sent.
    private func streamRestore(_ plan: RulePlan, family: IPFamily) throws(NodeError) -> (IptablesDesired, [UInt8]) {
        let s = plan.settings
        var builder = IptablesDesired.Builder(plan: plan, family: family)
        let head = builder.headChains
        let headEnd = builder.byteCount
        var stage = 0
        let input = try tools(family).restore { () -> [UInt8]? in
            switch stage {
            case 0:
                stage = 1
                return Array(("*nat\n" + head.map { ":\($0) - [0:0]\n" }.joined()).utf8)
            case 1:
                var chunk: [UInt8] = []
                if let batch = builder.addTargetChains(upTo: 1024) {
                    chunk += batch.chains.map { ":\($0) - [0:0]\n" }.joined().utf8
                    builder.copyBytes(batch.range, into: &chunk)
                    return chunk
                }
                stage = 2
                builder.copyBytes(0..<headEnd, into: &chunk)
                let tail = IptablesRenderer.jumpLines(s, output: true, postrouting: s.masquerade) + ["COMMIT"]
                chunk += tail.map { $0 + "\n" }.joined().utf8
                return chunk
            default:
                return nil
            }
        }
        return (builder.finished, input)
    }

    /// Runs one restore per family, in order. When a later one fails, the families already changed are
    /// put back from their pre-apply save (best effort), and the error says what happened to them.
    func commit(_ steps: [(owned: IptablesOwned, script: String)], _ s: PlanSettings) throws(NodeError) {
        try commit(steps.map { step in ({ step.owned }, { () throws(NodeError) in try tools(step.owned.family).restore(step.script) }) }, s)
    }

    /// `commit`, with each family's restore as a closure (a streamed one, in `applyFresh`), and the state to
    /// put it back to made only when a later family fails (an update's fast path does not build it otherwise).
    func commit(_ steps: [(before: () -> IptablesOwned, restore: () throws(NodeError) -> Void)], _ s: PlanSettings) throws(NodeError) {
        var done: [() -> IptablesOwned] = []
        for step in steps {
            do {
                try step.restore()
            } catch {
                guard !done.isEmpty else { throw error }
                let notes = done.map { rollback(to: $0(), s) }
                throw NodeError(exitCode: error.exitCode, description: error.description + "\n  " + notes.joined(separator: "\n  "))
            }
            done.append(step.before)
        }
    }

    private func rollback(to before: IptablesOwned, _ s: PlanSettings) -> String {
        let f = "\(variant.displayName) \(before.family.rawValue)"
        do {
            let now = try owned(before.family, settings: s, required: true)
            try tools(before.family).restore(rollbackScript(before: before, now: now))
            return "the \(f) rules had already been changed; they were put back as they were before this run"
        } catch {
            return "the \(f) rules had already been changed, and putting them back failed too (\(error.description)); "
                + "check with `hostnet-dnat status --backend iptables` and re-apply or remove"
        }
    }

    private func summary(_ plan: RulePlan, changes: [Change], dryRun: Bool) -> String {
        let s = plan.settings
        var parts: [String] = []
        for (desired, _, _) in changes where !desired.isEmpty {
            parts.append("\(desired.family.rawValue): \(desired.mappings) mapping(s), \(desired.targetChainCount) target chain(s)")
        }
        if parts.isEmpty { parts.append("no mappings") }
        let count = changes.reduce(0) { $0 + $1.differences.count }
        let verb = dryRun ? "would change" : "changed"
        let state = count == 0 ? "already up to date" : "\(verb) \(count) thing(s)"
        let order = s.runsBeforeKubeProxy ? "first in nat OUTPUT (before kube-proxy's jump)"
                                           : "last in nat OUTPUT (after kube-proxy's jump, if any)"
        let skipped = changes.flatMap(\.desired.skipped)
        let warning = skipped.isEmpty ? "" : "; WARNING: \(skipped.count) mapping(s) left out: " + skipped.joined(separator: "; ")
        return "\(variant.displayName) (\(variantReason)) in \(context.place): \(parts.joined(separator: "; ")); "
            + "jump to \(s.chain) \(order); \(state)\(warning)"
    }

    func diff(_ plan: RulePlan) throws(NodeError) -> [String] {
        try Capabilities.require(for: "reading \(variant.displayName) rules", context: context)
        return try plannedChanges(plan).flatMap(\.differences)
    }

    func remove(_ s: PlanSettings) throws(NodeError) -> Bool {
        try Capabilities.require(for: "removing \(variant.displayName) rules", context: context)
        return try ApplyLock.withLock { () throws(NodeError) -> Bool in
            var families: [IptablesOwned] = []
            for family in IPFamily.allCases { families.append(try self.owned(family, settings: s, required: false)) }
            try checkBeforeWriting(families.map { (nil, $0) }, s, action: "remove")
            let steps = families.filter { !$0.isEmpty }.map { ($0, removeScript($0, s)) }
            try commit(steps, s)
            return !steps.isEmpty
        }
    }

    func status(_ s: PlanSettings) throws(NodeError) -> NodeStatus {
        try Capabilities.require(for: "reading \(variant.displayName) rules", context: context)
        var status = NodeStatus(backend: .iptables, netns: context.netns?.path, iptablesVariant: variant)
        status.notes.append("variant: \(variantReason)")
        for family in IPFamily.allCases {
            let owned = try self.owned(family, settings: s, required: false)
            let fam = family.rawValue
            for j in owned.outputJumps {
                var where_ = ""
                if let k = owned.kubeServicesIndex { where_ = j.index < k ? ", before KUBE-SERVICES" : ", after KUBE-SERVICES" }
                status.hooks.append("\(fam) nat OUTPUT rule \(j.index + 1): \(j.rule.text)\(where_)")
            }
            for j in owned.postroutingJumps {
                status.hooks.append("\(fam) nat POSTROUTING rule \(j.index + 1): \(j.rule.text)")
            }
            if owned.outputJumps.count > 1 { status.notes.append("\(fam): OUTPUT jumps to \(s.chain) \(owned.outputJumps.count) times") }
            if !owned.chains.isEmpty && owned.outputJumps.isEmpty {
                status.notes.append("\(fam): \(s.chain) exists but nothing jumps to it from OUTPUT: its rules are inactive")
            }
            for chain in owned.chainOrder {
                status.ruleset += ":\(chain)  # \(fam)\n"
            }
            for chain in owned.chainOrder {
                for r in owned.chains[chain] ?? [] { status.ruleset += "-A \(chain) \(r.text)\n" }
            }
            for r in owned.chains[s.chain] ?? [] {
                guard let m = StatusMapping(rule: r, family: family, chains: owned.chains, nat: owned.nat) else { continue }
                // A mapping with source ranges has one dispatch rule per range: show it once, with all of them.
                if let last = status.mappings.last, !m.sourceRanges.isEmpty, (last.family, last.externalIP, last.protocol, last.port, last.target)
                    == (m.family, m.externalIP, m.protocol, m.port, m.target), !last.sourceRanges.isEmpty {
                    status.mappings[status.mappings.count - 1].sourceRanges += m.sourceRanges
                    continue
                }
                status.mappings.append(m)
            }
            let referenced = Set((owned.chains[s.chain] ?? []).compactMap(\.target))
            for chain in owned.chainOrder where chain.hasPrefix("HNDNAT-") && !referenced.contains(chain) {
                status.notes.append("\(fam): chain \(chain) is not used by \(s.chain) (stale; the next apply removes it)")
            }
        }
        status.installed = !status.ruleset.isEmpty || !status.hooks.isEmpty
        return status
    }
}

extension StatusMapping {
    /// `-d 203.0.113.10/32 -p tcp -m tcp --dport 443 -m comment --comment "…" -j HNDNAT-…` → a mapping.
    init?(rule: SavedRuleset.Rule, family: IPFamily, chains: [String: [SavedRuleset.Rule]], nat: SavedRuleset.Table?) {
        func value(_ flag: String, in tokens: [String]) -> String? {
            guard let i = tokens.firstIndex(of: flag), i + 1 < tokens.count else { return nil }
            return tokens[i + 1]
        }
        let t = rule.tokens
        guard let d = value("-d", in: t), let p = value("-p", in: t), let port = value("--dport", in: t).flatMap({ Int($0) }),
              let target = rule.target else { return nil }
        let address = d.split(separator: "/").first.map(String.init) ?? d
        var destinations: [String] = []
        let targetRules = chains[target] ?? nat?.rules(target) ?? []
        var affinity: Int? = nil
        if target.hasPrefix("HNDNAT-") {
            // With affinity each destination has a `recent` rule and a pick rule: list it once.
            for r in targetRules {
                if let d = value("--to-destination", in: r.tokens), !destinations.contains(d) { destinations.append(d) }
                if affinity == nil, let sec = value("--seconds", in: r.tokens).flatMap({ Int($0) }) { affinity = sec }
            }
        }
        let ranges = value("-s", in: t).map { [$0] } ?? []
        self.init(family: family, externalIP: address, protocol: p, port: port, target: target,
                  destinations: destinations, comment: value("--comment", in: t), sourceRanges: ranges, affinityTimeout: affinity)
    }
}
