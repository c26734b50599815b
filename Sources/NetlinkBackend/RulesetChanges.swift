import NetAddress
import RulePlanning
import ServiceResolution

/// Incremental updates: the operations that turn the table an earlier plan installed into the table of a new
/// plan without replacing it (docs/ruleset.md, "Incremental updates"). Pure.
///
/// Only elements and pick chains change between two plans with the same table, priority and masquerade
/// setting; the table, the base chains, the maps and sets and their rules stay. Elements are keyed:
/// dispatch `addr . proto . port` (verdict `goto pick<f>-<p>-<N>` and the comment), endpoints
/// `addr . proto . port . slot` (data `addr . port`), masquerade `addr`. An element whose key stays but whose
/// data, verdict or comment changes is deleted and added again (the kernel cannot change an element in place).
extension RulesetProgram {
    /// A mapping's key: one dispatch element (and the prefix of its endpoint slots).
    struct MappingKey: Hashable, Comparable {
        var address: IPAddress
        var `protocol`: TransportProtocol
        var port: Int

        init(_ m: Mapping) { address = m.externalIP; `protocol` = m.protocol; port = m.port }

        /// The planner's order of rules.
        static func < (a: MappingKey, b: MappingKey) -> Bool { (a.address, a.protocol, a.port) < (b.address, b.protocol, b.port) }
    }

    /// Whether `new` can be reached from `old` by changing elements and pick chains only. The table name,
    /// the output chain's priority and masquerading (the postrouting chain and the masquerade sets) are
    /// part of the table's shape: changing them takes a full replace.
    static func sameShape(_ old: PlanSettings, _ new: PlanSettings) -> Bool {
        old.table == new.table && old.priority == new.priority && old.masquerade == new.masquerade
    }

    /// `addr . proto . port comment "…" : goto pick<f>-<p>-<N>`.
    static func dispatchElement(_ m: Mapping, comment: String) -> NftElement {
        let pick = NftPickChain(family: m.family, protocol: m.protocol, count: m.target.destinations.count)
        return NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port), verdict: NftVerdict(code: Nft.verdictGoto, chain: pick.name),
                          userdata: Userdata.elementComment(comment))
    }

    static func dispatchText(_ m: Mapping, comment: String) -> String {
        let pick = NftPickChain(family: m.family, protocol: m.protocol, count: m.target.destinations.count)
        return "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) comment \"\(comment)\" : goto \(pick.name)"
    }

    static func endpointText(_ m: Mapping, slot: Int) -> String {
        let d = m.target.destinations[slot]
        return "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) . \(slot) : \(d.ip) . \(d.port)"
    }

    /// The batch that turns the table `old` installed into the one `new` describes, in this order: new pick
    /// chains with their rule (NLM_F_EXCL), element deletes (by key), element adds (NLM_F_EXCL), then deletes
    /// of pick chains that no element uses any more (after the deletes of every element that jumped to them;
    /// the kernel deletes a chain's rule with the chain). Empty when the plans install the same table. nil
    /// when the table's shape differs (`sameShape`), or `old` is not a plan this backend could have
    /// installed (or holds a key twice; no planner output does): the caller replaces the whole table
    /// instead. O(mappings + slots): keys are matched by `partners`, then one pass over each plan.
    ///
    /// Adds are exclusive and deletes name exact keys, so a kernel table that is not what `old` says (an
    /// element deleted or added by hand, a missing table) makes the kernel refuse the whole batch (ENOENT,
    /// EEXIST): nothing is committed, and the caller falls back to a full apply.
    static func changes(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> [NftOperation]? {
        try validate(new)
        guard sameShape(old.settings, new.settings) else { return nil }
        // `old` was validated when it was applied; only a plan no table can carry is checked again.
        let oldChains = old.targetChains
        if oldChains.indices.contains(where: { oldChains[$0].isKubeProxyJump }) { return nil }
        // Source ranges (ranged4/6 and their rules) and affinity chains and sets are not updated in place yet.
        // When they are exactly as before, everything else is diffed as usual (their rules compare equal and
        // give no operation; the affinity sets keep their clients); when they changed, a full replace (which
        // also empties the affinity sets).
        if (old.hasSourceRanges || new.hasSourceRanges || !old.affinityChains.isEmpty || !new.affinityChains.isEmpty)
            && !samePolicy(old, new) { return nil }
        let table = new.settings.table

        // Pick chains.
        var chainAdds: [NftOperation] = [], chainDeletes: [NftOperation] = []
        let oldPicks = pickChains(old), newPicks = pickChains(new)
        let oldPickSet = Set(oldPicks), newPickSet = Set(newPicks)
        for p in newPicks where !oldPickSet.contains(p) {
            chainAdds.append(NftOperation(kind: .newChain(NftChain(family: .inet, table: table, name: p.name, base: nil)),
                                          description: "adding chain \(p.name)", exclusive: true))
            let exprs = pickRule(family: p.family, protocol: p.protocol, count: p.count)
            chainAdds.append(NftOperation(kind: .newRule(NftRule(family: .inet, table: table, chain: p.name, expressions: exprs, userdata: nil)),
                                          description: "adding rule to chain \(p.name): \(pickRuleText(p))",
                                          expressionDescriptions: exprs.map(\.description)))
        }
        for p in oldPicks where !newPickSet.contains(p) {
            chainDeletes.append(NftOperation(kind: .deleteChain(NftChain(family: .inet, table: table, name: p.name, base: nil)),
                                             description: "deleting chain \(p.name) (with its rule)"))
        }

        // Elements. Each `new` rule's partner in `old` (same key); one pass over `new` finds what to add
        // and, for keys in both, what to delete; the `old` rules no `new` rule matched are deleted whole.
        // Deletes come before adds in the batch (a changed element is deleted and added again).
        // (Indexing instead of iterating copies: a PlannedRule copy retains half a dozen strings and arrays.)
        let oldRules = old.rules, newRules = new.rules
        guard let partner = partners(old: oldRules, new: newRules) else { return nil }
        var matched = [Bool](repeating: false, count: oldRules.count)
        // Per family (0: IPv4, 1: IPv6): dispatch entries by rule index, slots by (rule index, slot).
        var goneDispatch: [[Int32]] = [[], []], comingDispatch: [[Int32]] = [[], []]
        var goneSlots: [[(rule: Int32, slot: Int32)]] = [[], []], comingSlots: [[(rule: Int32, slot: Int32)]] = [[], []]
        for j in newRules.indices {
            let theirs = newRules[j].mapping.target.destinations, fi = newRules[j].mapping.externalIP.family == .ipv4 ? 0 : 1
            let j32 = Int32(j), i32 = partner[j]
            guard i32 >= 0 else {
                comingDispatch[fi].append(j32)
                for s in theirs.indices { comingSlots[fi].append((j32, Int32(s))) }
                continue
            }
            let i = Int(i32)
            matched[i] = true
            let mine = oldRules[i].mapping.target.destinations
            if mine.count != theirs.count
                || old.targetChains[oldRules[i].targetIndex].comment != new.targetChains[newRules[j].targetIndex].comment {
                goneDispatch[fi].append(i32)
                comingDispatch[fi].append(j32)
            }
            for s in 0..<max(mine.count, theirs.count) {
                let inOld = s < mine.count, inNew = s < theirs.count
                if inOld && inNew && mine[s] == theirs[s] { continue }
                if inOld { goneSlots[fi].append((i32, Int32(s))) }
                if inNew { comingSlots[fi].append((j32, Int32(s))) }
            }
        }
        for i in oldRules.indices where !matched[i] {
            let fi = oldRules[i].mapping.externalIP.family == .ipv4 ? 0 : 1
            goneDispatch[fi].append(Int32(i))
            for s in oldRules[i].mapping.target.destinations.indices { goneSlots[fi].append((Int32(i), Int32(s))) }
        }

        var deletes: [[NftOperation]] = [[], [], [], [], [], []]  // dispatch4, dispatch6, endpoints4, endpoints6, masquerade4, masquerade6
        var adds: [[NftOperation]] = [[], [], [], [], [], []]
        for (fi, f) in [IPFamily.ipv4, .ipv6].enumerated() {
            let dispatch = dispatchSet(table, f, id: nil), endpoints = endpointsSet(table, f, id: nil)
            let gd = goneDispatch[fi], cd = comingDispatch[fi], gs = goneSlots[fi], cs = comingSlots[fi]
            deletes[fi] = elementOperations(
                set: dispatch, kind: "map", elements: gd.map { i in
                    let m = oldRules[Int(i)].mapping
                    return NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port))
                }, delete: true) { k in
                    let r = oldRules[Int(gd[k])]
                    return dispatchText(r.mapping, comment: comment(old, r))
                }
            adds[fi] = elementOperations(
                set: dispatch, kind: "map", elements: cd.map { j in
                    let r = newRules[Int(j)]
                    return dispatchElement(r.mapping, comment: comment(new, r))
                }, exclusive: true) { k in
                    let r = newRules[Int(cd[k])]
                    return dispatchText(r.mapping, comment: comment(new, r))
                }
            deletes[2 + fi] = elementOperations(
                set: endpoints, kind: "map", elements: gs.map { o in
                    let m = oldRules[Int(o.rule)].mapping
                    return NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: Int(o.slot)))
                }, delete: true) { k in
                    endpointText(oldRules[Int(gs[k].rule)].mapping, slot: Int(gs[k].slot))
                }
            adds[2 + fi] = elementOperations(
                set: endpoints, kind: "map", elements: cs.map { o in
                    let m = newRules[Int(o.rule)].mapping
                    return NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: Int(o.slot)),
                                      data: destinationData(m.target.destinations[Int(o.slot)]))
                }, exclusive: true) { k in
                    endpointText(newRules[Int(cs[k].rule)].mapping, slot: Int(cs[k].slot))
                }

            if new.settings.masquerade {
                let oldAddresses = externalAddresses(old, f), newAddresses = externalAddresses(new, f)
                let oldSet = Set(oldAddresses), newSet = Set(newAddresses)
                let removed = oldAddresses.filter { !newSet.contains($0) }, added = newAddresses.filter { !oldSet.contains($0) }
                let masq = masqSet(table, f, id: nil)
                deletes[4 + fi] = elementOperations(set: masq, kind: "set", elements: removed.map { NftElement(key: $0.bytes) },
                                                    delete: true) { removed[$0].description }
                adds[4 + fi] = elementOperations(set: masq, kind: "set", elements: added.map { NftElement(key: $0.bytes) },
                                                 exclusive: true) { added[$0].description }
            }
        }
        return chainAdds + deletes.flatMap { $0 } + adds.flatMap { $0 } + chainDeletes
    }

    /// For each rule of `new`, the index of the rule of `old` with the same key, or -1; nil when a plan holds
    /// a key twice. The planner sorts rules by key, so this is normally a merge of two sorted lists (no
    /// hashing); rules in any other order are matched through a hash index of `old`. O(n) either way.
    static func partners(old: [PlannedRule], new: [PlannedRule]) -> [Int32]? {
        func increasing(_ rules: [PlannedRule]) -> Bool {
            rules.indices.dropFirst().allSatisfy { MappingKey(rules[$0 - 1].mapping) < MappingKey(rules[$0].mapping) }
        }
        var out = [Int32](repeating: -1, count: new.count)
        if increasing(old) && increasing(new) {
            var i = 0
            for j in new.indices {
                let k = MappingKey(new[j].mapping)
                while i < old.count && MappingKey(old[i].mapping) < k { i += 1 }
                if i < old.count && MappingKey(old[i].mapping) == k { out[j] = Int32(i); i += 1 }
            }
            return out
        }
        var index: [MappingKey: Int32] = [:]
        index.reserveCapacity(old.count)
        for i in old.indices where index.updateValue(Int32(i), forKey: MappingKey(old[i].mapping)) != nil { return nil }
        var seen = Set<MappingKey>()
        seen.reserveCapacity(new.count)
        for j in new.indices {
            let k = MappingKey(new[j].mapping)
            guard seen.insert(k).inserted else { return nil }
            out[j] = index[k] ?? -1
        }
        return out
    }

    private static func comment(_ plan: RulePlan, _ r: PlannedRule) -> String { plan.targetChains[r.targetIndex].comment }

    // `RulePlan.nftPickChains` and `externalAddresses(_:)` walk copies of every rule (a copy retains half a
    // dozen strings and arrays): most of the cost of a diff of 26k mappings. These read the rules in place.

    /// `plan.nftPickChains`.
    /// The mappings with source ranges or ClientIP affinity, with their target chains, are the same in both
    /// plans (and so are the affinity chains): what `changes` cannot update in place is untouched.
    static func samePolicy(_ old: RulePlan, _ new: RulePlan) -> Bool {
        func policy(_ p: RulePlan) -> [(Mapping, TargetChain)] {
            p.rules.compactMap { r in
                let chain = p.targetChains[r.targetIndex]
                return r.mapping.sourceRanges.isEmpty && chain.affinityTimeout == nil ? nil : (r.mapping, chain)
            }
        }
        let a = policy(old), b = policy(new)
        guard a.count == b.count, old.affinityChains == new.affinityChains else { return false }
        return zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    }

    static func pickChains(_ plan: RulePlan) -> [NftPickChain] {
        // Which counts occur, per family and protocol (6 short bit lists instead of hashing every rule).
        let protocols = TransportProtocol.allCases.sorted()
        var used = [[Bool]](repeating: [], count: 2 * protocols.count)
        let rules = plan.rules, chains = plan.targetChains
        for i in rules.indices where chains[rules[i].targetIndex].affinityTimeout == nil {
            let n = rules[i].mapping.target.destinations.count
            guard n > 0, let p = protocols.firstIndex(of: rules[i].mapping.protocol) else { continue }
            let slot = (rules[i].mapping.externalIP.family == .ipv4 ? 0 : protocols.count) + p
            if used[slot].count <= n { used[slot] += [Bool](repeating: false, count: n + 1 - used[slot].count) }
            used[slot][n] = true
        }
        var out: [NftPickChain] = []
        for (k, counts) in used.enumerated() {
            for n in counts.indices where counts[n] {
                out.append(NftPickChain(family: k < protocols.count ? .ipv4 : .ipv6, protocol: protocols[k % protocols.count], count: n))
            }
        }
        return out.sorted()  // (already in order unless NftPickChain's order changes)
    }

    /// `plan.externalAddresses(f)` (rules are sorted by address within a family).
    static func externalAddresses(_ plan: RulePlan, _ f: IPFamily) -> [IPAddress] {
        var out: [IPAddress] = []
        let rules = plan.rules
        for i in rules.indices where rules[i].mapping.externalIP.family == f {
            if out.last != rules[i].mapping.externalIP { out.append(rules[i].mapping.externalIP) }
        }
        return out
    }

    /// What a batch changes: elements added and deleted, chains added and deleted.
    static func counts(_ ops: [NftOperation]) -> (elementsAdded: Int, elementsDeleted: Int, chainsAdded: Int, chainsDeleted: Int) {
        var c = (elementsAdded: 0, elementsDeleted: 0, chainsAdded: 0, chainsDeleted: 0)
        for op in ops {
            switch op.kind {
            case .newElements(_, let e): c.elementsAdded += e.count
            case .deleteElements(_, let e): c.elementsDeleted += e.count
            case .newChain: c.chainsAdded += 1
            case .deleteChain: c.chainsDeleted += 1
            default: break
            }
        }
        return c
    }
}
