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
    /// installed: the caller replaces the whole table instead. O(mappings + slots) with hashing.
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

        // Elements, per family: deletes first (in `old`'s order), then adds (in `new`'s order).
        var deletes: [[NftOperation]] = [[], [], [], [], [], []]  // dispatch4, dispatch6, endpoints4, endpoints6, masquerade4, masquerade6
        var adds: [[NftOperation]] = [[], [], [], [], [], []]
        for (fi, f) in [IPFamily.ipv4, .ipv6].enumerated() {
            let oldRules = old.rules(f), newRules = new.rules(f)
            guard let oldIndex = index(oldRules), let newIndex = index(newRules) else { return nil }
            let oldComments = oldRules.map { old.targetChains[$0.targetIndex].comment }
            let newComments = newRules.map { new.targetChains[$0.targetIndex].comment }

            /// Walks `rules` of one plan against the other plan's index: the dispatch elements and endpoint
            /// slots of `rules` that the other plan does not hold exactly so.
            func differing(_ rules: [PlannedRule], _ comments: [String], against otherRules: [PlannedRule], _ otherComments: [String],
                           _ otherIndex: [MappingKey: Int]) -> (dispatch: [Int32], slots: [(rule: Int32, slot: Int32)]) {
                var dispatch: [Int32] = [], slots: [(rule: Int32, slot: Int32)] = []
                for (i, r) in rules.enumerated() {
                    let m = r.mapping, mine = m.target.destinations
                    guard let j = otherIndex[MappingKey(m)] else {
                        dispatch.append(Int32(i))
                        for s in mine.indices { slots.append((Int32(i), Int32(s))) }
                        continue
                    }
                    let theirs = otherRules[j].mapping.target.destinations
                    if mine.count != theirs.count || comments[i] != otherComments[j] { dispatch.append(Int32(i)) }
                    for s in mine.indices where s >= theirs.count || mine[s] != theirs[s] { slots.append((Int32(i), Int32(s))) }
                }
                return (dispatch, slots)
            }
            let gone = differing(oldRules, oldComments, against: newRules, newComments, newIndex)
            let coming = differing(newRules, newComments, against: oldRules, oldComments, oldIndex)

            let dispatch = dispatchSet(table, f, id: nil), endpoints = endpointsSet(table, f, id: nil)
            deletes[fi] = elementOperations(
                set: dispatch, kind: "map", elements: gone.dispatch.map { i in
                    let m = oldRules[Int(i)].mapping
                    return NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port))
                }, delete: true) { [gone] k in
                    let i = Int(gone.dispatch[k])
                    return dispatchText(oldRules[i].mapping, comment: oldComments[i])
                }
            adds[fi] = elementOperations(
                set: dispatch, kind: "map", elements: coming.dispatch.map { i in
                    dispatchElement(newRules[Int(i)].mapping, comment: newComments[Int(i)])
                }, exclusive: true) { [coming] k in
                    let i = Int(coming.dispatch[k])
                    return dispatchText(newRules[i].mapping, comment: newComments[i])
                }
            deletes[2 + fi] = elementOperations(
                set: endpoints, kind: "map", elements: gone.slots.map { o in
                    let m = oldRules[Int(o.rule)].mapping
                    return NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: Int(o.slot)))
                }, delete: true) { [gone] k in
                    endpointText(oldRules[Int(gone.slots[k].rule)].mapping, slot: Int(gone.slots[k].slot))
                }
            adds[2 + fi] = elementOperations(
                set: endpoints, kind: "map", elements: coming.slots.map { o in
                    let m = newRules[Int(o.rule)].mapping
                    return NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: Int(o.slot)),
                                      data: destinationData(m.target.destinations[Int(o.slot)]))
                }, exclusive: true) { [coming] k in
                    endpointText(newRules[Int(coming.slots[k].rule)].mapping, slot: Int(coming.slots[k].slot))
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

    /// Key → position in `rules`; nil when a key occurs twice (no planner output does; a full apply then
    /// reports whatever the kernel makes of it).
    private static func index(_ rules: [PlannedRule]) -> [MappingKey: Int]? {
        var out: [MappingKey: Int] = [:]
        out.reserveCapacity(rules.count)
        for (i, r) in rules.enumerated() where out.updateValue(i, forKey: MappingKey(r.mapping)) != nil { return nil }
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
