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
    struct MappingKey: Hashable {
        var address: IPAddress
        var `protocol`: TransportProtocol
        var port: Int

        init(_ m: Mapping) { address = m.externalIP; `protocol` = m.protocol; port = m.port }
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
    /// instead. O(mappings + slots): one hash index of `old`, one pass over each plan.
    ///
    /// Adds are exclusive and deletes name exact keys, so a kernel table that is not what `old` says (an
    /// element deleted or added by hand, a missing table) makes the kernel refuse the whole batch (ENOENT,
    /// EEXIST): nothing is committed, and the caller falls back to a full apply.
    static func changes(from old: RulePlan, to new: RulePlan) throws(NetlinkError) -> [NftOperation]? {
        try validate(new)
        guard sameShape(old.settings, new.settings) else { return nil }
        do { try validate(old) } catch { return nil }
        let table = new.settings.table

        // Pick chains.
        var chainAdds: [NftOperation] = [], chainDeletes: [NftOperation] = []
        let oldPicks = old.nftPickChains, newPicks = new.nftPickChains
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

        // Elements. One index of `old` by key; one pass over `new` finds what to add and, for keys in both,
        // what to delete; the `old` entries that no `new` entry matched are deleted whole. Deletes come
        // before adds in the batch (a changed element is deleted and added again).
        let oldRules = old.rules, newRules = new.rules
        var oldIndex: [MappingKey: Int32] = [:]
        oldIndex.reserveCapacity(oldRules.count)
        for (i, r) in oldRules.enumerated() where oldIndex.updateValue(Int32(i), forKey: MappingKey(r.mapping)) != nil { return nil }
        var matched = [Bool](repeating: false, count: oldRules.count)
        // Per family (0: IPv4, 1: IPv6): dispatch entries by rule index, slots by (rule index, slot).
        var goneDispatch: [[Int32]] = [[], []], comingDispatch: [[Int32]] = [[], []]
        var goneSlots: [[(rule: Int32, slot: Int32)]] = [[], []], comingSlots: [[(rule: Int32, slot: Int32)]] = [[], []]
        for (j, n) in newRules.enumerated() {
            let m = n.mapping, theirs = m.target.destinations, fi = m.family == .ipv4 ? 0 : 1, j32 = Int32(j)
            guard let i32 = oldIndex[MappingKey(m)] else {
                comingDispatch[fi].append(j32)
                for s in theirs.indices { comingSlots[fi].append((j32, Int32(s))) }
                continue
            }
            let i = Int(i32)
            if matched[i] { return nil }  // the same key twice in `new` (see index(_:))
            matched[i] = true
            let o = oldRules[i], mine = o.mapping.target.destinations
            if mine.count != theirs.count || old.targetChains[o.targetIndex].comment != new.targetChains[n.targetIndex].comment {
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
        for (i, r) in oldRules.enumerated() where !matched[i] {
            let fi = r.mapping.family == .ipv4 ? 0 : 1
            goneDispatch[fi].append(Int32(i))
            for s in r.mapping.target.destinations.indices { goneSlots[fi].append((Int32(i), Int32(s))) }
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
                let oldAddresses = old.externalAddresses(f), newAddresses = new.externalAddresses(f)
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

    private static func comment(_ plan: RulePlan, _ r: PlannedRule) -> String { plan.targetChains[r.targetIndex].comment }

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
