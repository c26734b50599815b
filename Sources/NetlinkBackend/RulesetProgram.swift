import NetAddress
import RulePlanning
import ServiceResolution

/// `RulePlan` → the exact nf_tables objects of docs/ruleset.md: table, delete table, table, all chains
/// (output, postrouting, the pick chains), the maps and sets (dispatch4/6, endpoints4/6, masquerade4/6), the
/// rules, and only then the elements. The kernel ends up with what `nft -f` of the rendered script installs
/// (nft sends each set's elements right after the set), but binding a map to a rule walks all of the map's
/// elements once per chain that looks it up (nf_tables_bind_set), so with the elements already in place
/// every pick chain would walk all of endpoints4/6: most of the kernel's time for 20k mappings. Pure.
struct RulesetProgram {
    static let outputChain = "output"
    static let postroutingChain = "postrouting"
    static let masqueradePriority: Int32 = 100
    /// nft refuses longer comments (NFTNL_UDATA_COMMENT_MAXLEN).
    static let maxCommentLength = 128
    /// The table's comment: it marks the table as ours. apply and remove refuse a `table inet <name>` without
    /// it, so that they never replace or delete another tool's table (firewalld's, say).
    static let ownershipComment = RulePlan.nftOwnershipComment

    static func dispatchMap(_ f: IPFamily) -> String { f == .ipv4 ? "dispatch4" : "dispatch6" }
    static func endpointsMap(_ f: IPFamily) -> String { f == .ipv4 ? "endpoints4" : "endpoints6" }
    static func masqueradeSet(_ f: IPFamily) -> String { f == .ipv4 ? "masquerade4" : "masquerade6" }
    static func rangedMap(_ f: IPFamily) -> String { f == .ipv4 ? "ranged4" : "ranged6" }

    /// Refuses what an nftables table cannot express, before anything touches the kernel.
    static func validate(_ plan: RulePlan) throws(NetlinkError) {
        // (Index loops read rules and chains in place; `first(where:)` would copy each one: see pickChains.)
        let chains = plan.targetChains, rules = plan.rules
        if plan.hasKubeProxyJumps, let why = plan.nftablesRefusal {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0, message: why)
        }
        if let i = rules.indices.first(where: { rules[$0].mapping.target.destinationCount == 0 }) {
            let r = rules[i]
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "mapping \(r.mapping.externalIP.bracketed):\(r.mapping.port)/\(r.mapping.protocol.lowercased) "
                                   + "(\(plan.targetChains[r.targetIndex].comment)) has no destination")
        }
        guard plan.settings.priority >= Int(Int32.min), plan.settings.priority <= Int(Int32.max) else {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "priority \(plan.settings.priority) is out of range")
        }
        if let i = chains.indices.first(where: { chains[$0].comment.utf8.count > maxCommentLength }) {
            let chain = chains[i]
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "comment \"\(chain.comment)\" is longer than \(maxCommentLength) bytes")
        }
    }

    // MARK: expressions (shared with the read-back checks)

    /// `ip daddr . meta l4proto . th dport vmap @dispatch4` (ip6 alike).
    static func dispatchRule(_ f: IPFamily) -> [NftExpr] {
        let v4 = f == .ipv4
        return [
            .meta(key: Nft.metaNFProto, dreg: Nft.reg1),
            .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6]),
            .payload(base: Nft.payloadNetworkHeader, offset: v4 ? 16 : 24, len: v4 ? 4 : 16, dreg: Nft.reg1),
            .meta(key: Nft.metaL4Proto, dreg: v4 ? Nft.reg32_01 : Nft.reg2),
            .payload(base: Nft.payloadTransportHeader, offset: 2, len: 2, dreg: v4 ? Nft.reg32_02 : Nft.reg32_05),
            .lookup(set: dispatchMap(f), setID: setID(dispatchOf: f), sreg: Nft.reg1, dreg: Nft.regVerdict, flags: nil),
        ]
    }

    /// `ip daddr . meta l4proto . th dport . ip saddr vmap @ranged4` (ip6 alike), as nft linearizes it for an
    /// interval lookup: the l4proto register goes through a `byteorder` (a no-op for one byte, but nft emits it).
    static func rangedRule(_ f: IPFamily) -> [NftExpr] {
        let v4 = f == .ipv4
        let proto = v4 ? Nft.reg32_01 : Nft.reg2
        return [
            .meta(key: Nft.metaNFProto, dreg: Nft.reg1),
            .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6]),
            .payload(base: Nft.payloadNetworkHeader, offset: v4 ? 16 : 24, len: v4 ? 4 : 16, dreg: Nft.reg1),
            .meta(key: Nft.metaL4Proto, dreg: proto),
            .byteorder(sreg: proto, dreg: proto, op: Nft.byteorderHton, len: 1, size: 2),
            .payload(base: Nft.payloadTransportHeader, offset: 2, len: 2, dreg: v4 ? Nft.reg32_02 : Nft.reg32_05),
            .payload(base: Nft.payloadNetworkHeader, offset: v4 ? 12 : 8, len: v4 ? 4 : 16, dreg: v4 ? Nft.reg32_03 : Nft.reg32_06),
            .lookup(set: rangedMap(f), setID: setID(rangedOf: f), sreg: Nft.reg1, dreg: Nft.regVerdict, flags: nil),
        ]
    }

    /// The rules of an affinity chain, as nft linearizes `NftRenderer.affinityRules`: `sets[i]` is the
    /// affinity set of destination i (name and batch id).
    static func affinityRules(_ chain: TargetChain, sets: [(name: String, id: UInt32?)]) -> [[NftExpr]] {
        affinityRules(family: chain.family, protocolNumber: chain.protocol.number, destinations: chain.target.destinations, sets: sets)
    }

    static func affinityRules(family: IPFamily, protocolNumber: UInt8, destinations dests: [Destination],
                              sets: [(name: String, id: UInt32?)]) -> [[NftExpr]] {
        let v4 = family == .ipv4
        let proto: [NftExpr] = [.meta(key: Nft.metaL4Proto, dreg: Nft.reg1), .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [protocolNumber])]
        let nfproto: [NftExpr] = [.meta(key: Nft.metaNFProto, dreg: Nft.reg1),
                                  .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6])]
        let saddr = NftExpr.payload(base: Nft.payloadNetworkHeader, offset: v4 ? 12 : 8, len: v4 ? 4 : 16, dreg: Nft.reg1)
        func translate(_ i: Int) -> [NftExpr] {
            var addr: [UInt8] = []
            append(dests[i].ip, to: &addr)
            return [saddr, .dynset(op: Nft.dynsetUpdate, sreg: Nft.reg1, set: sets[i].name, setID: sets[i].id),
                    .immediate(dreg: Nft.reg1, data: addr), .immediate(dreg: Nft.reg2, data: Nft.bigEndian16(dests[i].port)),
                    .nat(type: Nft.natDNAT, family: UInt32(v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6), addrMin: Nft.reg1, addrMax: nil,
                         protoMin: Nft.reg2, protoMax: nil, flags: nil)]
        }
        var rules = dests.indices.map { i in
            proto + nfproto + [saddr, .lookup(set: sets[i].name, setID: sets[i].id, sreg: Nft.reg1, dreg: nil, flags: nil)] + translate(i)
        }
        for i in dests.indices {
            let remaining = dests.count - i
            if remaining > 1 {
                rules.append(proto + [.numgen(dreg: Nft.reg1, modulus: UInt32(remaining), type: Nft.numgenRandom, offset: 0),
                                      .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: Nft.hostOrder(0))] + nfproto + translate(i))
            } else {
                rules.append(proto + nfproto + translate(i))
            }
        }
        return rules
    }

    /// `ct status dnat ct original ip daddr @masquerade4 masquerade` (ip6 alike).
    static func masqueradeRule(_ f: IPFamily) -> [NftExpr] {
        [
            .ct(key: Nft.ctStatus, dreg: Nft.reg1, direction: nil),
            .bitwise(sreg: Nft.reg1, dreg: Nft.reg1, len: 4, mask: Nft.hostOrder(Nft.ctStatusDNAT), xor: Nft.hostOrder(0)),
            .cmp(op: Nft.cmpNeq, sreg: Nft.reg1, data: Nft.hostOrder(0)),
            .ct(key: f == .ipv4 ? Nft.ctDstIP : Nft.ctDstIP6, dreg: Nft.reg1, direction: Nft.ctDirOriginal),
            .lookup(set: masqueradeSet(f), setID: setID(masqueradeOf: f), sreg: Nft.reg1, dreg: nil, flags: nil),
            .masq,
        ]
    }

    /// `meta l4proto <p> dnat ip to ip daddr . meta l4proto . th dport . numgen random mod <n> map @endpoints4`
    /// (ip6 alike), as nft linearizes it: the protocol match, the implicit `meta nfproto` dependency of
    /// `ip daddr`, the key in consecutive 32-bit registers (address, l4proto, port, slot), the data-map
    /// lookup into reg 1 (address) and the next register (port), then the nat.
    static func pickRule(family f: IPFamily, protocol p: TransportProtocol, count n: Int) -> [NftExpr] {
        pickRule(family: f, protocolNumber: p.number, modulus: UInt32(n))
    }

    static func pickRule(family f: IPFamily, protocolNumber: UInt8, modulus: UInt32) -> [NftExpr] {
        let v4 = f == .ipv4
        return [
            .meta(key: Nft.metaL4Proto, dreg: Nft.reg1),
            .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [protocolNumber]),
            .meta(key: Nft.metaNFProto, dreg: Nft.reg1),
            .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6]),
            .payload(base: Nft.payloadNetworkHeader, offset: v4 ? 16 : 24, len: v4 ? 4 : 16, dreg: Nft.reg1),
            .meta(key: Nft.metaL4Proto, dreg: v4 ? Nft.reg32_01 : Nft.reg2),
            .payload(base: Nft.payloadTransportHeader, offset: 2, len: 2, dreg: v4 ? Nft.reg32_02 : Nft.reg32_05),
            .numgen(dreg: v4 ? Nft.reg32_03 : Nft.reg32_06, modulus: modulus, type: Nft.numgenRandom, offset: 0),
            .lookup(set: endpointsMap(f), setID: setID(endpointsOf: f), sreg: Nft.reg1, dreg: Nft.reg1, flags: nil),
            .nat(type: Nft.natDNAT, family: UInt32(v4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6), addrMin: Nft.reg1, addrMax: nil,
                 protoMin: v4 ? Nft.reg32_01 : Nft.reg2, protoMax: nil, flags: nil),
        ]
    }

    // MARK: element encodings

    // (These build each array in place: a large plan has a hundred thousand of them.)

    /// Appends the address in network order (4 or 16 bytes).
    static func append(_ ip: IPAddress, to b: inout [UInt8]) {
        if ip.family == .ipv4 {
            let v = UInt32(truncatingIfNeeded: ip.low)
            b.append(UInt8(truncatingIfNeeded: v >> 24)); b.append(UInt8(truncatingIfNeeded: v >> 16))
            b.append(UInt8(truncatingIfNeeded: v >> 8)); b.append(UInt8(truncatingIfNeeded: v))
        } else {
            for half in [ip.high, ip.low] {
                for shift in stride(from: 56, through: 0, by: -8) { b.append(UInt8(truncatingIfNeeded: half >> UInt64(shift))) }
            }
        }
    }

    /// A port in network order, padded to 4 bytes.
    private static func append(port: Int, to b: inout [UInt8]) {
        b.append(UInt8(truncatingIfNeeded: port >> 8)); b.append(UInt8(truncatingIfNeeded: port)); b.append(0); b.append(0)
    }

    /// `addr . proto . port`, each field padded to 4 bytes (registers are 32-bit).
    static func dispatchKey(_ ip: IPAddress, _ p: TransportProtocol, _ port: Int) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(24)
        append(ip, to: &b)
        b.append(p.number); b.append(0); b.append(0); b.append(0)
        append(port: port, to: &b)
        return b
    }

    /// `addr . proto . port . slot`: the dispatch key followed by the slot in host byte order (it is
    /// compared with numgen's output, a host-order register).
    static func endpointKey(_ ip: IPAddress, _ p: TransportProtocol, _ port: Int, slot: Int) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(28)
        append(ip, to: &b)
        b.append(p.number); b.append(0); b.append(0); b.append(0)
        append(port: port, to: &b)
        withUnsafeBytes(of: UInt32(slot)) { b.append(contentsOf: $0) }  // host byte order
        return b
    }

    /// `addr . port` data of the endpoints maps.
    static func destinationData(_ d: Destination) -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(20)
        append(d.ip, to: &b)
        append(port: d.port, to: &b)
        return b
    }

    static func setID(dispatchOf f: IPFamily) -> UInt32 { f == .ipv4 ? 1 : 2 }
    static func setID(endpointsOf f: IPFamily) -> UInt32 { f == .ipv4 ? 3 : 4 }
    static func setID(masqueradeOf f: IPFamily) -> UInt32 { f == .ipv4 ? 5 : 6 }
    static func setID(rangedOf f: IPFamily) -> UInt32 { f == .ipv4 ? 7 : 8 }
    /// Affinity sets are numbered from here, in `RulePlan.affinityChains` then destination order.
    static let firstAffinitySetID: UInt32 = 100

    /// `dispatchKey` followed by a source address: the key (block's first address) or key end (its last).
    static func rangedKey(_ ip: IPAddress, _ p: TransportProtocol, _ port: Int, source: IPAddress) -> [UInt8] {
        var b = dispatchKey(ip, p, port)
        append(source, to: &b)
        return b
    }

    /// `type <addr> . inet_proto . inet_service . <addr> : verdict; flags interval`: nft's pipapo set, with
    /// the byte length of each field (NFTA_SET_DESC_CONCAT) and the same userdata as the dispatch maps.
    static func rangedSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        let addr = f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr
        let n: UInt8 = f == .ipv4 ? 4 : 16
        return NftSet(family: .inet, table: table, name: rangedMap(f), id: id, flags: Nft.setMap | Nft.setInterval | Nft.setConcat,
                      keyType: Nft.concat([addr, Nft.typeInetProto, Nft.typeInetService, addr]),
                      keyLength: f == .ipv4 ? 16 : 40, dataType: Nft.dataVerdict, dataLength: 0, size: nil,
                      userdata: Userdata.concatVerdictMap, concatFields: [n, 1, 2, n])
    }

    /// `type <addr>; flags dynamic,timeout; timeout <T>s`.
    static func affinitySet(_ table: String, name: String, _ f: IPFamily, timeoutSeconds: Int, id: UInt32?) -> NftSet {
        NftSet(family: .inet, table: table, name: name, id: id, flags: Nft.setTimeout | Nft.setEval,
               keyType: f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, keyLength: f == .ipv4 ? 4 : 16,
               dataType: nil, dataLength: nil, size: nil, userdata: Userdata.addressSet, timeout: UInt64(timeoutSeconds) * 1000)
    }

    static func dispatchSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        NftSet(family: .inet, table: table, name: dispatchMap(f), id: id, flags: Nft.setMap,
               keyType: Nft.concat([f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, Nft.typeInetProto, Nft.typeInetService]),
               keyLength: f == .ipv4 ? 12 : 24, dataType: Nft.dataVerdict, dataLength: 0, size: nil,
               userdata: Userdata.concatVerdictMap)
    }

    /// `typeof <f> daddr . meta l4proto . th dport . numgen random mod 1 : <f> daddr . th dport`: key types
    /// address . inet_proto . inet_service . integer (16 or 28 bytes), data address . inet_service (8 or 20).
    static func endpointsSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        let addr = f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr
        return NftSet(family: .inet, table: table, name: endpointsMap(f), id: id, flags: Nft.setMap,
                      keyType: Nft.concat([addr, Nft.typeInetProto, Nft.typeInetService, Nft.typeInteger]),
                      keyLength: f == .ipv4 ? 16 : 28, dataType: Nft.concat([addr, Nft.typeInetService]),
                      dataLength: f == .ipv4 ? 8 : 20, size: nil, userdata: Userdata.endpointsMap(ipv6: f == .ipv6))
    }

    static func masqSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        NftSet(family: .inet, table: table, name: masqueradeSet(f), id: id, flags: 0,
               keyType: f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, keyLength: f == .ipv4 ? 4 : 16,
               dataType: nil, dataLength: nil, size: nil, userdata: Userdata.addressSet)
    }

    // MARK: texts

    static func typeText(_ set: NftSet, _ f: IPFamily) -> String {
        let addr = f == .ipv4 ? "ipv4_addr" : "ipv6_addr", kw = f.nftKeyword
        switch set.name {
        case dispatchMap(f): return "type \(addr) . inet_proto . inet_service : verdict"
        case rangedMap(f): return "type \(addr) . inet_proto . inet_service . \(addr) : verdict; flags interval"
        case endpointsMap(f): return "typeof \(kw) daddr . meta l4proto . th dport . numgen random mod 1 : \(kw) daddr . th dport"
        default:
            if let t = set.timeout { return "type \(addr); flags dynamic,timeout; timeout \(t / 1000)s" }
            return "type \(addr)"
        }
    }

    static func pickRuleText(_ pick: NftPickChain) -> String {
        let kw = pick.family.nftKeyword
        return "meta l4proto \(pick.protocol.lowercased) dnat \(kw) to \(kw) daddr . meta l4proto . th dport . numgen random mod \(pick.count) map @\(endpointsMap(pick.family))"
    }

    // MARK: the batch

    /// Bytes of element attributes per NEWSETELEM message. The nested element list carries a 16-bit length,
    /// so it must stay below 64 KiB; the exact size of every element is counted (`wireSize`).
    static let elementListBudget = 60 * 1024

    static func operations(_ plan: RulePlan) throws(NetlinkError) -> [NftOperation] {
        try validate(plan)
        let table = plan.settings.table
        let masq = plan.settings.masquerade
        var ops: [NftOperation] = []
        let t = NftTable(family: .inet, name: table, userdata: Userdata.tableComment(ownershipComment))
        // The first table carries the comment too: when the table did not exist, readers (and the ownership
        // check of a concurrent apply) can see this empty table for a moment while the kernel commits the batch.
        // (On an existing table the kernel ignores it: the table is only updated.)
        ops.append(NftOperation(kind: .newTable(t), description: "creating table inet \(table) if missing"))
        ops.append(NftOperation(kind: .deleteTable(t), description: "deleting table inet \(table)"))
        ops.append(NftOperation(kind: .newTable(t), description: "adding table inet \(table) (comment \"\(ownershipComment)\")"))

        // Chains.
        let prio = Int32(plan.settings.priority)
        ops.append(NftOperation(
            kind: .newChain(NftChain(family: .inet, table: table, name: outputChain,
                                     base: NftBaseHook(type: "nat", hook: Nft.hookOutput, priority: prio))),
            description: "adding chain \(outputChain) (type nat hook output priority \(prio))"))
        if masq {
            ops.append(NftOperation(
                kind: .newChain(NftChain(family: .inet, table: table, name: postroutingChain,
                                         base: NftBaseHook(type: "nat", hook: Nft.hookPostrouting, priority: masqueradePriority))),
                description: "adding chain \(postroutingChain) (type nat hook postrouting priority \(masqueradePriority))"))
        }
        let picks = plan.nftPickChains
        for p in picks {
            ops.append(NftOperation(kind: .newChain(NftChain(family: .inet, table: table, name: p.name, base: nil)),
                                    description: "adding chain \(p.name)"))
        }
        let affinity = plan.affinityChains
        for c in affinity { ops.append(affinityChainOperation(table, c)) }

        // Maps and sets; their elements go last (see above).
        let families: [IPFamily] = [.ipv4, .ipv6]
        let rulesByFamily = families.map { plan.rules($0, ranged: false) }
        var elementOps: [NftOperation] = []
        for (fi, f) in families.enumerated() {
            let set = dispatchSet(table, f, id: setID(dispatchOf: f))
            ops.append(NftOperation(kind: .newSet(set), description: "adding map \(set.name) (\(typeText(set, f)))"))
            let rules = rulesByFamily[fi]
            let comments = rules.map { plan.targetChains[$0.targetIndex].comment }
            let targets = rules.map { plan.nftChain(of: $0) }
            var elements: [NftElement] = []
            elements.reserveCapacity(rules.count)
            for (i, r) in rules.enumerated() {
                elements.append(dispatchElement(r.mapping, target: targets[i], comment: comments[i]))
            }
            elementOps += elementOperations(set: set, kind: "map", elements: elements) { i in
                dispatchText(rules[i].mapping, target: targets[i], comment: comments[i])
            }
        }
        let ranged = plan.hasSourceRanges
        for f in families where ranged {
            let set = rangedSet(table, f, id: setID(rangedOf: f))
            ops.append(rangedSetOperation(set, f))
            let rules = plan.rules(f, ranged: true)
            var elements: [NftElement] = []
            var texts: [String] = []
            for r in rules {
                let m = r.mapping
                let comment = plan.targetChains[r.targetIndex].comment, target = plan.nftChain(of: r)
                for block in m.sourceRanges {
                    elements.append(rangedElement(m, block, target: target, comment: comment))
                    texts.append(rangedText(m, block, target: target, comment: comment))
                }
            }
            elementOps += elementOperations(set: set, kind: "map", elements: elements) { [texts] i in texts[i] }
        }
        for (fi, f) in families.enumerated() {
            let set = endpointsSet(table, f, id: setID(endpointsOf: f))
            ops.append(NftOperation(kind: .newSet(set), description: "adding map \(set.name) (\(typeText(set, f)))"))
            let rules = plan.rules(f).filter { plan.targetChains[$0.targetIndex].affinityTimeout == nil }
            // (rule index, slot) of every element, to describe one on demand.
            var origin: [(rule: Int32, slot: Int32)] = []
            var elements: [NftElement] = []
            for (ri, r) in rules.enumerated() {
                let m = r.mapping
                for (slot, d) in m.target.destinations.enumerated() {
                    elements.append(NftElement(key: endpointKey(m.externalIP, m.protocol, m.port, slot: slot), data: destinationData(d)))
                    origin.append((Int32(ri), Int32(slot)))
                }
            }
            elementOps += elementOperations(set: set, kind: "map", elements: elements) { [origin] i in
                endpointText(rules[Int(origin[i].rule)].mapping, slot: Int(origin[i].slot))
            }
        }
        if masq {
            for f in families {
                let set = masqSet(table, f, id: setID(masqueradeOf: f))
                ops.append(NftOperation(kind: .newSet(set), description: "adding set \(set.name) (\(typeText(set, f)))"))
                let addrs = plan.externalAddresses(f)
                elementOps += elementOperations(set: set, kind: "set", elements: addrs.map { NftElement(key: $0.bytes) }) { addrs[$0].description }
            }
        }
        var affinitySets: [[(name: String, id: UInt32?)]] = []
        var nextID = firstAffinitySetID
        for c in affinity {
            var sets: [(name: String, id: UInt32?)] = []
            for d in c.target.destinations {
                ops.append(affinitySetOperation(table, c, d, id: nextID))
                sets.append((c.affinityName(d), nextID))
                nextID += 1
            }
            affinitySets.append(sets)
        }

        // Rules.
        for f in families {
            ops.append(ruleOperation(table, outputChain, dispatchRule(f), text: "\(f.nftKeyword) daddr . meta l4proto . th dport vmap @\(dispatchMap(f))"))
        }
        for f in families where ranged { ops.append(rangedRuleOperation(table, f)) }
        if masq {
            for f in families {
                ops.append(ruleOperation(table, postroutingChain, masqueradeRule(f),
                                         text: "ct status dnat ct original \(f.nftKeyword) daddr @\(masqueradeSet(f)) masquerade"))
            }
        }
        for p in picks {
            ops.append(ruleOperation(table, p.name, pickRule(family: p.family, protocol: p.protocol, count: p.count), text: pickRuleText(p)))
        }
        for (c, sets) in zip(affinity, affinitySets) { ops += affinityRuleOperations(table, c, sets: sets) }
        return ops + elementOps
    }

    // MARK: objects shared by the full apply and incremental updates (so that the two cannot drift)

    static func ruleOperation(_ table: String, _ chain: String, _ exprs: [NftExpr], text: String) -> NftOperation {
        NftOperation(kind: .newRule(NftRule(family: .inet, table: table, chain: chain, expressions: exprs, userdata: nil)),
                     description: "adding rule to chain \(chain): \(text)",
                     expressionDescriptions: exprs.map(\.description))
    }

    /// `addr . proto . port comment "…" : goto <target>` (a pick chain or an affinity chain).
    static func dispatchElement(_ m: Mapping, target: String, comment: String) -> NftElement {
        NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port), verdict: NftVerdict(code: Nft.verdictGoto, chain: target),
                   userdata: Userdata.elementComment(comment))
    }

    static func dispatchText(_ m: Mapping, target: String, comment: String) -> String {
        "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) comment \"\(comment)\" : goto \(target)"
    }

    /// `addr . proto . port . <block> comment "…" : goto <target>`: one source block of a mapping with
    /// `loadBalancerSourceRanges`, an interval from the block's first to its last address.
    static func rangedElement(_ m: Mapping, _ block: CIDR, target: String, comment: String) -> NftElement {
        NftElement(key: rangedKey(m.externalIP, m.protocol, m.port, source: block.address),
                   keyEnd: rangedKey(m.externalIP, m.protocol, m.port, source: block.last),
                   verdict: NftVerdict(code: Nft.verdictGoto, chain: target),
                   userdata: Userdata.elementComment(comment))
    }

    static func rangedText(_ m: Mapping, _ block: CIDR, target: String, comment: String) -> String {
        "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) . \(block) comment \"\(comment)\" : goto \(target)"
    }

    /// `set` is `rangedSet(table, f, id:)`.
    static func rangedSetOperation(_ set: NftSet, _ f: IPFamily, exclusive: Bool = false) -> NftOperation {
        NftOperation(kind: .newSet(set), description: "adding map \(set.name) (\(typeText(set, f)))", exclusive: exclusive)
    }

    /// Appended to the output chain after both dispatch rules.
    static func rangedRuleOperation(_ table: String, _ f: IPFamily) -> NftOperation {
        ruleOperation(table, outputChain, rangedRule(f),
                      text: "\(f.nftKeyword) daddr . meta l4proto . th dport . \(f.nftKeyword) saddr vmap @\(rangedMap(f))")
    }

    static func affinityChainOperation(_ table: String, _ c: TargetChain, exclusive: Bool = false) -> NftOperation {
        NftOperation(kind: .newChain(NftChain(family: .inet, table: table, name: c.iptablesName, base: nil)),
                     description: "adding chain \(c.iptablesName) (ClientIP affinity for \(c.comment))", exclusive: exclusive)
    }

    /// The affinity set of destination `d` of the affinity chain `c`.
    static func affinitySetOperation(_ table: String, _ c: TargetChain, _ d: Destination, id: UInt32?, exclusive: Bool = false) -> NftOperation {
        let set = affinitySet(table, name: c.affinityName(d), c.family, timeoutSeconds: c.affinityTimeout ?? 0, id: id)
        return NftOperation(kind: .newSet(set), description: "adding set \(set.name) (\(typeText(set, c.family)), ClientIP affinity to \(d))",
                            exclusive: exclusive)
    }

    /// The rules of the affinity chain `c`; `sets[i]` is destination i's affinity set (name and batch id).
    static func affinityRuleOperations(_ table: String, _ c: TargetChain, sets: [(name: String, id: UInt32?)]) -> [NftOperation] {
        zip(affinityRules(c, sets: sets), c.nftAffinityRules).map { exprs, text in ruleOperation(table, c.iptablesName, exprs, text: text) }
    }

    /// The exact size of an element's attributes inside NFTA_SET_ELEM_LIST_ELEMENTS (libnftnl's encoding:
    /// element nest; key nest with NFTA_DATA_VALUE; data nest with NFTA_DATA_VALUE or NFTA_DATA_VERDICT
    /// holding the code and the chain name; userdata).
    static func wireSize(_ e: NftElement) -> Int {
        func a(_ n: Int) -> Int { (n + 3) & ~3 }
        var n = 4 + 4 + 4 + a(e.key.count)
        if let d = e.data { n += 4 + 4 + a(d.count) }
        if let k = e.keyEnd { n += 4 + 4 + a(k.count) }
        if let v = e.verdict { n += 4 + 4 + 8 + (v.chain.map { 4 + a($0.utf8.count + 1) } ?? 0) }
        if let u = e.userdata { n += 4 + a(u.count) }
        return n
    }

    /// Splits elements over as many NEWSETELEM messages as their nested list needs. `text(i)` describes
    /// element `i` (of `elements`); it is called for the first and last of each message, and otherwise only
    /// when an error names an element.
    /// With `delete`, DELSETELEM messages instead (keys only, so they are smaller and may hold more
    /// elements); `exclusive` sets NLM_F_EXCL on NEWSETELEM (see `NftOperation.exclusive`).
    static func elementOperations(set: NftSet, kind: String, elements: [NftElement], delete: Bool = false,
                                  exclusive: Bool = false, text: @escaping @Sendable (Int) -> String) -> [NftOperation] {
        var ops: [NftOperation] = []
        var start = 0
        let name = set.name
        while start < elements.count {
            var size = 0
            var end = start
            while end < elements.count {
                let cost = wireSize(elements[end])
                if end > start && size + cost > elementListBudget { break }
                size += cost
                end += 1
            }
            let n = end - start
            let what = n == 1 ? "element \(text(start))" : "\(n) elements (\(text(start)) … \(text(end - 1)))"
            let offset = start
            let part = Array(elements[start..<end])
            let (verb, preposition) = delete ? ("deleting", "from") : ("adding", "to")
            ops.append(NftOperation(kind: delete ? .deleteElements(set, part) : .newElements(set, part),
                                    description: "\(verb) \(what) \(preposition) \(kind) \(name)",
                                    elementDescription: { i in "\(verb) element \(text(offset + i)) \(preposition) \(kind) \(name)" },
                                    exclusive: exclusive))
            start = end
        }
        return ops
    }
}
