import NetAddress
import RulePlanning
import ServiceResolution

/// Incremental updates: the operations that turn the table an earlier plan installed into the table of a new
/// plan without replacing it (docs/ruleset.md, "Incremental updates"). Pure.
///
/// Between two plans with the same table, priority and masquerade setting, the table, the base chains, the
/// dispatch, endpoints and masquerade maps and sets and their rules stay; elements, pick chains, affinity
/// chains and sets change. Elements are keyed: dispatch `addr . proto . port` (verdict `goto` a pick or an
/// affinity chain, and the comment), ranged `addr . proto . port . source block` (the same), endpoints
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

    static func endpointText(_ m: Mapping, slot: Int) -> String {
        let d = m.target.destinations[slot]
        return "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) . \(slot) : \(d.ip) . \(d.port)"
    }

    /// The batch that turns the table `old` installed into the one `new` describes, in this order: new pick
    /// chains with their rule (NLM_F_EXCL); the ranged maps and their rules when the first mapping with
    /// source ranges appears; new affinity sets, then new affinity chains; the flush of every affinity chain
    /// whose destinations changed; the rules of new and rewritten affinity chains; element deletes (by key);
    /// element adds (NLM_F_EXCL); deletes of pick chains no element uses any more and of affinity chains no
    /// longer in the plan (after the deletes of every element that jumped to them; the kernel deletes a
    /// chain's rules with the chain); last the affinity sets of destinations that went (after the rules that
    /// looked them up are gone). Affinity sets are named by destination, so the set of a destination that
    /// stays is never touched and its clients keep their endpoint.
    ///
    /// Empty when the plans install the same table. nil (the caller replaces the whole table instead) when the
    /// table's shape differs (`sameShape`), the last mapping with source ranges goes (the ranged rules would
    /// have to be deleted by handle), an affinity chain's timeout changes (a set's timeout is fixed), or
    /// `old` is not a plan this backend could have installed (or holds a key twice; no planner output does).
    /// O(mappings + slots + source blocks + affinity destinations): keys are matched by `partners`, then one
    /// pass over each plan.
    ///
    /// Adds are exclusive and deletes name exact keys, so a kernel table that is not what `old` says (an
    /// element deleted or added by hand, a missing table) makes the kernel refuse the whole batch (ENOENT,
    /// EEXIST): nothing is committed, and the caller falls back to a full apply.
    static func changes(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> [NftOperation]? {
        try validate(new)
        guard sameShape(old.settings, new.settings) else { return nil }
        // `old` was validated when it was applied; only a plan no table can carry is checked again.
        let oldChains = old.targetChains, newChains = new.targetChains
        if old.hasKubeProxyJumps { return nil }
        let oldRanged = hasSourceRanges(old), newRanged = hasSourceRanges(new)
        if oldRanged && !newRanged { return nil }
        let table = new.settings.table
        guard let affinity = affinityChanges(from: old, to: new, table: table) else { return nil }

        // Pick chains.
        var chainAdds: [NftOperation] = [], chainDeletes: [NftOperation] = []
        let oldPicks = pickChains(old), newPicks = pickChains(new)
        let oldPickSet = Set(oldPicks), newPickSet = Set(newPicks)
        for p in newPicks where !oldPickSet.contains(p) {
            chainAdds.append(NftOperation(kind: .newChain(NftChain(family: .inet, table: table, name: p.name, base: nil)),
                                          description: "adding chain \(p.name)", exclusive: true))
            chainAdds.append(ruleOperation(table, p.name, pickRule(family: p.family, protocol: p.protocol, count: p.count), text: pickRuleText(p)))
        }
        for p in oldPicks where !newPickSet.contains(p) {
            chainDeletes.append(NftOperation(kind: .deleteChain(NftChain(family: .inet, table: table, name: p.name, base: nil)),
                                             description: "deleting chain \(p.name) (with its rule)"))
        }
        // The first mapping with source ranges: both ranged maps, their rules after the dispatch rules.
        var rangedAdds: [NftOperation] = []
        if newRanged && !oldRanged {
            for f in [IPFamily.ipv4, .ipv6] { rangedAdds.append(rangedSetOperation(rangedSet(table, f, id: setID(rangedOf: f)), f, exclusive: true)) }
            for f in [IPFamily.ipv4, .ipv6] { rangedAdds.append(rangedRuleOperation(table, f)) }
        }

        // Elements. Each `new` rule's partner in `old` (same key); one pass over `new` finds what to add
        // and, for keys in both, what to delete; the `old` rules no `new` rule matched are deleted whole.
        // Deletes come before adds in the batch (a changed element is deleted and added again).
        // A mapping without source ranges has one dispatch element; one with source ranges has one ranged
        // element per block instead, all with the same verdict and comment. A mapping whose target chain has
        // affinity has no endpoint slots (its destinations are in the affinity chain's rules).
        // (Indexing instead of iterating copies: a PlannedRule copy retains half a dozen strings and arrays.)
        let oldRules = old.rules, newRules = new.rules
        guard let partner = partners(old: oldRules, new: newRules) else { return nil }
        var matched = [Bool](repeating: false, count: oldRules.count)
        // Per family (0: IPv4, 1: IPv6): dispatch entries by rule index, slots by (rule index, slot), ranged
        // elements by (rule index, block index).
        var goneDispatch: [[Int32]] = [[], []], comingDispatch: [[Int32]] = [[], []]
        var goneSlots: [[(rule: Int32, slot: Int32)]] = [[], []], comingSlots: [[(rule: Int32, slot: Int32)]] = [[], []]
        var goneBlocks: [[(rule: Int32, block: Int32)]] = [[], []], comingBlocks: [[(rule: Int32, block: Int32)]] = [[], []]
        for j in newRules.indices {
            let fi = newRules[j].mapping.externalIP.family == .ipv4 ? 0 : 1
            let j32 = Int32(j), i32 = partner[j], nt = newRules[j].targetIndex
            // The common case (every rule but the changed ones): the same destinations, source ranges and
            // verdict, so no element to delete or add. Checked first, without copying the lists below.
            if i32 >= 0 {
                let i = Int(i32), ot = oldRules[i].targetIndex
                let sticky = newChains[nt].affinityTimeout != nil
                if (oldChains[ot].affinityTimeout != nil) == sticky && oldChains[ot].comment == newChains[nt].comment
                    && (!sticky || oldChains[ot].iptablesName == newChains[nt].iptablesName)
                    && oldRules[i].mapping.target.isSame(as: newRules[j].mapping.target)
                    && oldRules[i].mapping.sourceRanges == newRules[j].mapping.sourceRanges {
                    matched[i] = true
                    continue
                }
            }
            let theirBlocks = newRules[j].mapping.sourceRanges
            let theirSticky = newChains[nt].affinityTimeout != nil
            let theirs = theirSticky ? [] : newRules[j].mapping.target.destinations
            func coming() {
                if theirBlocks.isEmpty { comingDispatch[fi].append(j32) }
                else { for k in theirBlocks.indices { comingBlocks[fi].append((j32, Int32(k))) } }
            }
            guard i32 >= 0 else {
                coming()
                for s in theirs.indices { comingSlots[fi].append((j32, Int32(s))) }
                continue
            }
            let i = Int(i32), ot = oldRules[i].targetIndex
            matched[i] = true
            let myBlocks = oldRules[i].mapping.sourceRanges
            let mySticky = oldChains[ot].affinityTimeout != nil
            let mine = mySticky ? [] : oldRules[i].mapping.target.destinations
            // The verdict: the same affinity chain, or the pick chain for the same number of destinations.
            let sameVerdict = mySticky == theirSticky
                && (mySticky ? oldChains[ot].iptablesName == newChains[nt].iptablesName : mine.count == theirs.count)
                && oldChains[ot].comment == newChains[nt].comment
            if sameVerdict && myBlocks.isEmpty == theirBlocks.isEmpty {
                if !myBlocks.isEmpty && myBlocks != theirBlocks {
                    let a = Set(myBlocks), b = Set(theirBlocks)
                    for k in myBlocks.indices where !b.contains(myBlocks[k]) { goneBlocks[fi].append((i32, Int32(k))) }
                    for k in theirBlocks.indices where !a.contains(theirBlocks[k]) { comingBlocks[fi].append((j32, Int32(k))) }
                }
            } else {
                if myBlocks.isEmpty { goneDispatch[fi].append(i32) }
                else { for k in myBlocks.indices { goneBlocks[fi].append((i32, Int32(k))) } }
                coming()
            }
            for s in 0..<max(mine.count, theirs.count) {
                let inOld = s < mine.count, inNew = s < theirs.count
                if inOld && inNew && mine[s] == theirs[s] { continue }
                if inOld { goneSlots[fi].append((i32, Int32(s))) }
                if inNew { comingSlots[fi].append((j32, Int32(s))) }
            }
        }
        for i in oldRules.indices where !matched[i] {
            let fi = oldRules[i].mapping.externalIP.family == .ipv4 ? 0 : 1, i32 = Int32(i)
            let blocks = oldRules[i].mapping.sourceRanges
            if blocks.isEmpty { goneDispatch[fi].append(i32) }
            else { for k in blocks.indices { goneBlocks[fi].append((i32, Int32(k))) } }
            guard oldChains[oldRules[i].targetIndex].affinityTimeout == nil else { continue }
            for s in oldRules[i].mapping.target.destinations.indices { goneSlots[fi].append((i32, Int32(s))) }
        }

        // dispatch4, dispatch6, ranged4, ranged6, endpoints4, endpoints6, masquerade4, masquerade6
        var deletes = [[NftOperation]](repeating: [], count: 8), adds = [[NftOperation]](repeating: [], count: 8)
        for (fi, f) in [IPFamily.ipv4, .ipv6].enumerated() {
            let dispatch = dispatchSet(table, f, id: nil), endpoints = endpointsSet(table, f, id: nil)
            let gd = goneDispatch[fi], cd = comingDispatch[fi], gs = goneSlots[fi], cs = comingSlots[fi]
            deletes[fi] = elementOperations(
                set: dispatch, kind: "map", elements: gd.map { i in
                    let m = oldRules[Int(i)].mapping
                    return NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port))
                }, delete: true) { k in
                    let r = oldRules[Int(gd[k])]
                    return dispatchText(r.mapping, target: old.nftChain(of: r), comment: comment(old, r))
                }
            adds[fi] = elementOperations(
                set: dispatch, kind: "map", elements: cd.map { j in
                    let r = newRules[Int(j)]
                    return dispatchElement(r.mapping, target: new.nftChain(of: r), comment: comment(new, r))
                }, exclusive: true) { k in
                    let r = newRules[Int(cd[k])]
                    return dispatchText(r.mapping, target: new.nftChain(of: r), comment: comment(new, r))
                }
            if newRanged {
                let ranged = rangedSet(table, f, id: nil)
                let gb = goneBlocks[fi], cb = comingBlocks[fi]
                deletes[2 + fi] = elementOperations(
                    set: ranged, kind: "map", elements: gb.map { o in
                        let m = oldRules[Int(o.rule)].mapping
                        let e = rangedElement(m, m.sourceRanges[Int(o.block)], target: "", comment: "")
                        return NftElement(key: e.key, keyEnd: e.keyEnd)
                    }, delete: true) { k in
                        let r = oldRules[Int(gb[k].rule)]
                        return rangedText(r.mapping, r.mapping.sourceRanges[Int(gb[k].block)], target: old.nftChain(of: r), comment: comment(old, r))
                    }
                adds[2 + fi] = elementOperations(
                    set: ranged, kind: "map", elements: cb.map { o in
                        let r = newRules[Int(o.rule)]
                        return rangedElement(r.mapping, r.mapping.sourceRanges[Int(o.block)], target: new.nftChain(of: r), comment: comment(new, r))
                    }, exclusive: true) { k in
                        let r = newRules[Int(cb[k].rule)]
                        return rangedText(r.mapping, r.mapping.sourceRanges[Int(cb[k].block)], target: new.nftChain(of: r), comment: comment(new, r))
                    }
            }
            deletes[4 + fi] = elementOperations(
                set: endpoints, kind: "map", elements: gs.map { o in
                    let m = oldRules[Int(o.rule)].mapping
                    return NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: Int(o.slot)))
                }, delete: true) { k in
                    endpointText(oldRules[Int(gs[k].rule)].mapping, slot: Int(gs[k].slot))
                }
            adds[4 + fi] = elementOperations(
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
                deletes[6 + fi] = elementOperations(set: masq, kind: "set", elements: removed.map { NftElement(key: $0.bytes) },
                                                    delete: true) { removed[$0].description }
                adds[6 + fi] = elementOperations(set: masq, kind: "set", elements: added.map { NftElement(key: $0.bytes) },
                                                 exclusive: true) { added[$0].description }
            }
        }
        return chainAdds + rangedAdds + affinity.setAdds + affinity.chainAdds + affinity.flushes + affinity.ruleAdds
            + deletes.flatMap { $0 } + adds.flatMap { $0 } + chainDeletes + affinity.chainDeletes + affinity.setDeletes
    }

    /// What changes among the affinity chains and sets, in batch order (see `changes`).
    struct AffinityChanges {
        var setAdds: [NftOperation] = [], chainAdds: [NftOperation] = [], flushes: [NftOperation] = [], ruleAdds: [NftOperation] = []
        var chainDeletes: [NftOperation] = [], setDeletes: [NftOperation] = []
    }

    /// Affinity chains are matched by name (the target chain's `iptablesName`), their sets by name
    /// (`affinityName`: chain and destination). A chain only in `new` is created with its sets and rules as
    /// the full apply makes them; one only in `old` is deleted (with its rules), then its sets. A chain in
    /// both whose destinations (or protocol) changed keeps the sets of the destinations that stay, gains
    /// sets for the new ones, and has its rules flushed and written anew (every rule depends on the number
    /// and order of destinations); the sets of the destinations that went are deleted after the flush. nil
    /// when a chain's timeout or family changed, or a plan names a chain twice: a full replace.
    static func affinityChanges(from old: RulePlan, to new: RulePlan, table: String) -> AffinityChanges? {
        let before = old.affinityChains, after = new.affinityChains
        var out = AffinityChanges()
        guard !before.isEmpty || !after.isEmpty else { return out }
        var index: [String: Int] = [:]
        for i in before.indices where index.updateValue(i, forKey: before[i].iptablesName) != nil { return nil }
        var kept = [Bool](repeating: false, count: before.count)
        var seen = Set<String>()
        var nextID = firstAffinitySetID
        func deleteSet(_ c: TargetChain, _ d: Destination) -> NftOperation {
            let set = affinitySet(table, name: c.affinityName(d), c.family, timeoutSeconds: c.affinityTimeout ?? 0, id: nil)
            return NftOperation(kind: .deleteSet(set), description: "deleting set \(set.name) (ClientIP affinity to \(d), with its clients)")
        }
        for c in after {
            guard seen.insert(c.iptablesName).inserted else { return nil }
            var sets: [(name: String, id: UInt32?)] = []
            guard let i = index[c.iptablesName] else {
                for d in c.target.destinations {
                    out.setAdds.append(affinitySetOperation(table, c, d, id: nextID, exclusive: true))
                    sets.append((c.affinityName(d), nextID))
                    nextID += 1
                }
                out.chainAdds.append(affinityChainOperation(table, c, exclusive: true))
                out.ruleAdds += affinityRuleOperations(table, c, sets: sets)
                continue
            }
            kept[i] = true
            let o = before[i]
            guard o.affinityTimeout == c.affinityTimeout, o.family == c.family else { return nil }
            if o.target.destinations == c.target.destinations && o.protocol == c.protocol { continue }
            let had = Set(o.target.destinations.map(o.affinityName))
            for d in c.target.destinations {
                let name = c.affinityName(d)
                if had.contains(name) { sets.append((name, nil)); continue }
                out.setAdds.append(affinitySetOperation(table, c, d, id: nextID, exclusive: true))
                sets.append((name, nextID))
                nextID += 1
            }
            out.flushes.append(NftOperation(kind: .flushChain(NftChain(family: .inet, table: table, name: c.iptablesName, base: nil)),
                                            description: "deleting the rules of chain \(c.iptablesName) (ClientIP affinity for \(c.comment))"))
            out.ruleAdds += affinityRuleOperations(table, c, sets: sets)
            let has = Set(sets.map(\.name))
            for d in o.target.destinations where !has.contains(o.affinityName(d)) { out.setDeletes.append(deleteSet(o, d)) }
        }
        for i in before.indices where !kept[i] {
            let o = before[i]
            out.chainDeletes.append(NftOperation(kind: .deleteChain(NftChain(family: .inet, table: table, name: o.iptablesName, base: nil)),
                                                 description: "deleting chain \(o.iptablesName) (ClientIP affinity for \(o.comment), with its rules)"))
            for d in o.target.destinations { out.setDeletes.append(deleteSet(o, d)) }
        }
        return out
    }

    /// `plan.hasSourceRanges`, reading the rules in place.
    static func hasSourceRanges(_ plan: RulePlan) -> Bool {
        let rules = plan.rules
        return rules.indices.contains { !rules[$0].mapping.sourceRanges.isEmpty }
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
    static func pickChains(_ plan: RulePlan) -> [NftPickChain] {
        // Which counts occur, per family and protocol (6 short bit lists instead of hashing every rule).
        let protocols = TransportProtocol.allCases.sorted()
        var used = [[Bool]](repeating: [], count: 2 * protocols.count)
        let rules = plan.rules, chains = plan.targetChains
        for i in rules.indices where chains[rules[i].targetIndex].affinityTimeout == nil {
            let n = rules[i].mapping.target.destinationCount
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

    /// What a batch changes: elements, chains and sets added and deleted, and chains whose rules were all
    /// deleted (an affinity chain written anew; its new rules come with it, as a pick chain's rule does).
    static func counts(_ ops: [NftOperation]) -> (elementsAdded: Int, elementsDeleted: Int, chainsAdded: Int, chainsDeleted: Int,
                                                  setsAdded: Int, setsDeleted: Int, chainsRewritten: Int) {
        var c = (elementsAdded: 0, elementsDeleted: 0, chainsAdded: 0, chainsDeleted: 0, setsAdded: 0, setsDeleted: 0, chainsRewritten: 0)
        for op in ops {
            switch op.kind {
            case .newElements(_, let e): c.elementsAdded += e.count
            case .deleteElements(_, let e): c.elementsDeleted += e.count
            case .newChain: c.chainsAdded += 1
            case .deleteChain: c.chainsDeleted += 1
            case .newSet: c.setsAdded += 1
            case .deleteSet: c.setsDeleted += 1
            case .flushChain: c.chainsRewritten += 1
            default: break
            }
        }
        return c
    }
}
