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
    /// Chains other than OUTPUT/POSTROUTING that jump into our main or masquerade chain.
    var foreignReferrers: [String] = []

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
        for name in ours {
            for referrer in (refs[name] ?? []).sorted() where referrer != "OUTPUT" && referrer != "POSTROUTING" && !ours.contains(referrer) {
                foreignReferrers.append("\(referrer) -> \(name)")
            }
        }
    }

    /// The OUTPUT jump is there exactly once, on the requested side of kube-proxy's.
    func outputJumpInPlace(_ s: PlanSettings) -> Bool {
        guard outputJumps.count == 1 else { return false }
        guard let k = kubeServicesIndex else { return true }
        return s.runsBeforeKubeProxy ? outputJumps[0].index < k : outputJumps[0].index > k
    }
}

/// What a plan wants in one family: the renderer's restore text, parsed.
struct IptablesDesired: Sendable {
    var family: IPFamily
    /// Lines between `*nat` and `COMMIT`, comments dropped: declarations first, then rules.
    var body: [String]
    var table: SavedRuleset.Table
    /// kube-proxy chains the plan jumps to, with the service they stand for.
    var kubeChains: [(chain: String, comment: String)]
    var mappings: Int
    var isEmpty: Bool { mappings == 0 }

    init(plan: RulePlan, family: IPFamily) {
        self.family = family
        mappings = plan.rules(family).count
        kubeChains = plan.targetChains(family).compactMap { c in
            if case .kubeProxyChain(let name) = c.target { return (name, c.comment) }
            return nil
        }
        guard mappings > 0 else {
            body = []; table = SavedRuleset.Table(name: "nat")
            return
        }
        let text = IptablesRenderer.render(plan, family: family, options: .init(includeJumps: false))
        body = text.split(separator: "\n").map(String.init)
            .filter { !$0.hasPrefix("#") && $0 != "*nat" && $0 != "COMMIT" && !$0.isEmpty }
        table = SavedRuleset.parse(text).table("nat") ?? SavedRuleset.Table(name: "nat")
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

    func differences(_ desired: IptablesDesired, _ owned: IptablesOwned, _ s: PlanSettings) -> [String] {
        let f = "\(variant.displayName) \(desired.family.rawValue)"
        var out: [String] = []
        var wanted = Set<String>()
        if !desired.isEmpty {
            for chain in desired.table.chainOrder {
                wanted.insert(chain)
                let want = desired.table.rules(chain).map(RuleNormalizer.normalize)
                guard let have = owned.chains[chain]?.map(RuleNormalizer.normalize) else {
                    out.append("\(f): add chain \(chain) (\(want.count) rule(s))")
                    continue
                }
                if want != have { out += lineDiff(prefix: "\(f): chain \(chain)", have: have, want: want) }
            }
        }
        for chain in owned.chainOrder where !wanted.contains(chain) {
            out.append("\(f): remove chain \(chain) (\(owned.chains[chain]?.count ?? 0) rule(s), not in the plan)")
        }
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
    private func lineDiff(prefix: String, have: [String], want: [String]) -> [String] {
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
        if desired.isEmpty { return removeScript(owned, s) }
        var lines = ["*nat"]
        let fixOutput = !owned.outputJumpInPlace(s)
        if fixOutput { lines += owned.outputJumps.map { "-D OUTPUT \($0.rule.text)" } }
        let wantMasq = s.masquerade
        if !wantMasq { lines += owned.postroutingJumps.map { "-D POSTROUTING \($0.rule.text)" } }
        else if owned.postroutingJumps.count > 1 { lines += owned.postroutingJumps.dropFirst().map { "-D POSTROUTING \($0.rule.text)" } }
        // Declaring a chain creates it or flushes it; only our chains are declared.
        lines += desired.body
        // Stale chains: flushed by declaring them, deleted once nothing refers to them any more.
        let wanted = Set(desired.table.chainOrder)
        for chain in owned.chainOrder where !wanted.contains(chain) {
            lines.append(":\(chain) - [0:0]")
        }
        for chain in owned.chainOrder where !wanted.contains(chain) {
            lines.append("-X \(chain)")
        }
        if fixOutput {
            lines.append(s.runsBeforeKubeProxy ? "-I OUTPUT 1 -j \(s.chain)" : "-A OUTPUT -j \(s.chain)")
        }
        if wantMasq && owned.postroutingJumps.isEmpty {
            lines.append("-A POSTROUTING -j \(s.masqueradeChain)")
        }
        lines.append("COMMIT")
        return lines.joined(separator: "\n") + "\n"
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

    // MARK: operations

    func plannedChanges(_ plan: RulePlan) throws(NodeError) -> [(IptablesDesired, IptablesOwned, [String])] {
        var out: [(IptablesDesired, IptablesOwned, [String])] = []
        for family in IPFamily.allCases {
            let desired = IptablesDesired(plan: plan, family: family)
            let owned = try self.owned(family, settings: plan.settings, required: !desired.isEmpty)
            try checkKubeProxyChains(desired, owned)
            if !owned.foreignReferrers.isEmpty && desired.isEmpty && !owned.isEmpty {
                throw .refused("cannot remove \(plan.settings.chain) from the \(variant.displayName) \(family.rawValue) nat table: "
                               + "other rules jump into it (\(owned.foreignReferrers.joined(separator: ", "))); delete those first")
            }
            out.append((desired, owned, differences(desired, owned, plan.settings)))
        }
        return out
    }

    /// The kube-proxy target jumps into kube-proxy's chains: each must exist, or the load would fail
    /// with iptables' "Couldn't load target" (legacy) / "Chain does not exist" (nft).
    func checkKubeProxyChains(_ desired: IptablesDesired, _ owned: IptablesOwned) throws(NodeError) {
        guard !desired.isEmpty, !desired.kubeChains.isEmpty else { return }
        let missing = desired.kubeChains.filter { owned.nat?.hasChain($0.chain) != true }
        guard !missing.isEmpty else { return }
        let list = missing.prefix(5).map { "\($0.chain) (\($0.comment))" }.joined(separator: ", ")
        let more = missing.count > 5 ? " and \(missing.count - 5) more" : ""
        throw .refused("--target kube-proxy: kube-proxy's chain \(list)\(more) does not exist in the \(variant.displayName) "
                       + "\(desired.family.rawValue) nat table of \(context.place). kube-proxy is not in iptables mode here, "
                       + "writes to the other variant (try --iptables \(variant == .nft ? "legacy" : "nft")), or has no such "
                       + "service port; use --target endpoints instead")
    }

    func apply(_ plan: RulePlan, dryRun: Bool) throws(NodeError) -> ApplyResult {
        try Capabilities.require(for: "applying \(variant.displayName) rules", context: context)
        return try ApplyLock.withLock { () throws(NodeError) -> ApplyResult in
            let changes = try plannedChanges(plan)
            let differences = changes.flatMap(\.2)
            if !dryRun {
                for (desired, owned, diffs) in changes where !diffs.isEmpty {
                    try tools(desired.family).restore(applyScript(desired, owned, plan.settings))
                }
                if !differences.isEmpty {
                    // Read back: what iptables-save prints must now match the plan exactly.
                    let after = try plannedChanges(plan).flatMap(\.2)
                    if !after.isEmpty {
                        throw .refused("the rules were loaded, but \(variant.displayName) now holds something other than the plan:\n  "
                                       + after.joined(separator: "\n  "))
                    }
                }
            }
            return ApplyResult(changed: !differences.isEmpty, differences: differences,
                               summary: summary(plan, changes: changes, dryRun: dryRun))
        }
    }

    private func summary(_ plan: RulePlan, changes: [(IptablesDesired, IptablesOwned, [String])], dryRun: Bool) -> String {
        let s = plan.settings
        var parts: [String] = []
        for (desired, _, _) in changes where !desired.isEmpty {
            let chains = plan.targetChains(desired.family).count
            parts.append("\(desired.family.rawValue): \(desired.mappings) mapping(s), \(chains) target chain(s)")
        }
        if parts.isEmpty { parts.append("no mappings") }
        let count = changes.reduce(0) { $0 + $1.2.count }
        let verb = dryRun ? "would change" : "changed"
        let state = count == 0 ? "already up to date" : "\(verb) \(count) thing(s)"
        let order = s.runsBeforeKubeProxy ? "first in nat OUTPUT (before kube-proxy's jump)"
                                           : "last in nat OUTPUT (after kube-proxy's jump, if any)"
        return "\(variant.displayName) (\(variantReason)) in \(context.place): \(parts.joined(separator: "; ")); "
            + "jump to \(s.chain) \(order); \(state)"
    }

    func diff(_ plan: RulePlan) throws(NodeError) -> [String] {
        try Capabilities.require(for: "reading \(variant.displayName) rules", context: context)
        return try plannedChanges(plan).flatMap(\.2)
    }

    func remove(_ s: PlanSettings) throws(NodeError) -> Bool {
        try Capabilities.require(for: "removing \(variant.displayName) rules", context: context)
        return try ApplyLock.withLock { () throws(NodeError) -> Bool in
            var removed = false
            for family in IPFamily.allCases {
                let owned = try self.owned(family, settings: s, required: false)
                guard !owned.isEmpty else { continue }
                if !owned.foreignReferrers.isEmpty {
                    throw .refused("cannot remove \(s.chain) from the \(variant.displayName) \(family.rawValue) nat table: other rules "
                                   + "jump into it (\(owned.foreignReferrers.joined(separator: ", "))); delete those first")
                }
                try tools(family).restore(removeScript(owned, s))
                removed = true
            }
            return removed
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
        if target.hasPrefix("HNDNAT-") {
            destinations = targetRules.compactMap { value("--to-destination", in: $0.tokens) }
        }
        self.init(family: family, externalIP: address, protocol: p, port: port, target: target,
                  destinations: destinations, comment: value("--comment", in: t))
    }
}
