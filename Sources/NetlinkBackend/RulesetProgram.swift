import NetAddress
import RulePlanning
import ServiceResolution

/// `RulePlan` → the exact nf_tables objects of docs/ruleset.md, in the order nft itself sends them for the
/// rendered script: table, delete table, table, all chains, the named sets with their elements, then the
/// rules (each anonymous numgen map right before the rule that uses it). Pure.
struct RulesetProgram {
    static let outputChain = "output"
    static let postroutingChain = "postrouting"
    static let masqueradePriority: Int32 = 100

    static func dispatchMap(_ f: IPFamily) -> String { f == .ipv4 ? "dispatch4" : "dispatch6" }
    static func masqueradeSet(_ f: IPFamily) -> String { f == .ipv4 ? "masquerade4" : "masquerade6" }

    /// Refuses what an nftables table cannot express, before anything touches the kernel.
    static func validate(_ plan: RulePlan) throws(NetlinkError) {
        if let chain = plan.targetChains.first(where: { if case .kubeProxyChain = $0.target { return true }; return false }) {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "the kube-proxy target (\(chain.comment)) jumps into kube-proxy's iptables chains, "
                                   + "which an nftables table cannot do; use --backend iptables (or --format iptables)")
        }
        if let chain = plan.targetChains.first(where: { $0.target.destinations.isEmpty }) {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "target chain \(chain.nftName) has no destination")
        }
        guard plan.settings.priority >= Int(Int32.min), plan.settings.priority <= Int(Int32.max) else {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0,
                               message: "priority \(plan.settings.priority) is out of range")
        }
        for chain in plan.targetChains where chain.nftName.utf8.count > 255 {
            throw NetlinkError(kind: .unsupportedPlan, operation: nil, errno: 0, message: "chain name \(chain.nftName) is too long")
        }
    }

    // MARK: expressions (shared with the read-back checks)

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

    /// `meta l4proto <p> dnat <ip|ip6> to A:P` or `… to numgen random mod N map @anon`.
    static func targetRule(family f: IPFamily, protocol p: TransportProtocol, destinations: [Destination],
                           anonymousSet: String = "__map%d", anonymousSetID: UInt32? = nil) -> [NftExpr] {
        let nfproto = UInt32(f == .ipv4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6)
        var e: [NftExpr] = [
            .meta(key: Nft.metaL4Proto, dreg: Nft.reg1),
            .cmp(op: Nft.cmpEq, sreg: Nft.reg1, data: [p.number]),
        ]
        if destinations.count == 1 {
            let d = destinations[0]
            e += [
                .immediate(dreg: Nft.reg1, data: d.ip.bytes),
                .immediate(dreg: Nft.reg2, data: Nft.bigEndian16(d.port)),
                .nat(type: Nft.natDNAT, family: nfproto, addrMin: Nft.reg1, addrMax: nil, protoMin: Nft.reg2, protoMax: nil,
                     flags: Nft.natRangeProtoSpecified),
            ]
        } else {
            // The map's data is `addr . port` starting in reg 1; the port follows the address, in the next
            // 32-bit register (reg 9 after 4 bytes) or the next 16-byte register (reg 2 after 16 bytes).
            e += [
                .numgen(dreg: Nft.reg1, modulus: UInt32(destinations.count), type: Nft.numgenRandom, offset: 0),
                .lookup(set: anonymousSet, setID: anonymousSetID, sreg: Nft.reg1, dreg: Nft.reg1, flags: nil),
                .nat(type: Nft.natDNAT, family: nfproto, addrMin: Nft.reg1, addrMax: nil,
                     protoMin: f == .ipv4 ? Nft.reg32_01 : Nft.reg2, protoMax: nil, flags: nil),
            ]
        }
        return e
    }

    // MARK: element encodings

    /// `addr . proto . port`, each field padded to 4 bytes (registers are 32-bit).
    static func dispatchKey(_ ip: IPAddress, _ p: TransportProtocol, _ port: Int) -> [UInt8] {
        ip.bytes + [p.number, 0, 0, 0] + Nft.bigEndian16(port) + [0, 0]
    }

    /// `addr . port` data of the anonymous numgen map.
    static func destinationData(_ d: Destination) -> [UInt8] { d.ip.bytes + Nft.bigEndian16(d.port) + [0, 0] }

    static func setID(dispatchOf f: IPFamily) -> UInt32 { f == .ipv4 ? 1 : 2 }
    static func setID(masqueradeOf f: IPFamily) -> UInt32 { f == .ipv4 ? 3 : 4 }
    static let firstAnonymousSetID: UInt32 = 16

    static func dispatchSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        NftSet(family: .inet, table: table, name: dispatchMap(f), id: id, flags: Nft.setMap,
               keyType: Nft.concat([f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, Nft.typeInetProto, Nft.typeInetService]),
               keyLength: f == .ipv4 ? 12 : 24, dataType: Nft.dataVerdict, dataLength: 0, size: nil,
               userdata: Userdata.concatVerdictMap)
    }

    static func masqSet(_ table: String, _ f: IPFamily, id: UInt32?) -> NftSet {
        NftSet(family: .inet, table: table, name: masqueradeSet(f), id: id, flags: 0,
               keyType: f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, keyLength: f == .ipv4 ? 4 : 16,
               dataType: nil, dataLength: nil, size: nil, userdata: Userdata.addressSet)
    }

    static func numgenMap(_ table: String, _ f: IPFamily, count: Int, id: UInt32) -> NftSet {
        NftSet(family: .inet, table: table, name: "__map%d", id: id,
               flags: Nft.setAnonymous | Nft.setConstant | Nft.setMap, keyType: Nft.typeInteger, keyLength: 4,
               dataType: Nft.concat([f == .ipv4 ? Nft.typeIPv4Addr : Nft.typeIPv6Addr, Nft.typeInetService]),
               dataLength: f == .ipv4 ? 8 : 20, size: UInt32(count), userdata: Userdata.numgenMap)
    }

    // MARK: the batch

    /// Elements per NEWSETELEM message are limited by the 16-bit length of the nested element list.
    static let elementListBudget = 48 * 1024

    static func operations(_ plan: RulePlan) throws(NetlinkError) -> [NftOperation] {
        try validate(plan)
        let table = plan.settings.table
        let masq = plan.settings.masquerade
        var ops: [NftOperation] = []
        let t = NftTable(family: .inet, name: table)
        ops.append(NftOperation(kind: .newTable(t), description: "creating table inet \(table) if missing"))
        ops.append(NftOperation(kind: .deleteTable(t), description: "deleting table inet \(table)"))
        ops.append(NftOperation(kind: .newTable(t), description: "adding table inet \(table)"))

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
        for c in plan.targetChains {
            ops.append(NftOperation(kind: .newChain(NftChain(family: .inet, table: table, name: c.nftName, base: nil)),
                                    description: "adding chain \(c.nftName)"))
        }

        // Named sets and their elements.
        for f in [IPFamily.ipv4, .ipv6] {
            let set = dispatchSet(table, f, id: setID(dispatchOf: f))
            let typeText = "\(f == .ipv4 ? "ipv4_addr" : "ipv6_addr") . inet_proto . inet_service : verdict"
            ops.append(NftOperation(kind: .newSet(set), description: "adding map \(set.name) (\(typeText))"))
            var elements: [NftElement] = []
            var texts: [String] = []
            for r in plan.rules(f) {
                let m = r.mapping
                let chain = plan.targetChains[r.targetIndex].nftName
                elements.append(NftElement(key: dispatchKey(m.externalIP, m.protocol, m.port),
                                           verdict: NftVerdict(code: Nft.verdictGoto, chain: chain)))
                texts.append("\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) : goto \(chain)")
            }
            ops += elementOperations(set: set, kind: "map", elements: elements, texts: texts)
        }
        if masq {
            for f in [IPFamily.ipv4, .ipv6] {
                let set = masqSet(table, f, id: setID(masqueradeOf: f))
                ops.append(NftOperation(kind: .newSet(set),
                                        description: "adding set \(set.name) (type \(f == .ipv4 ? "ipv4_addr" : "ipv6_addr"))"))
                let addrs = plan.externalAddresses(f)
                ops += elementOperations(set: set, kind: "set", elements: addrs.map { NftElement(key: $0.bytes) },
                                         texts: addrs.map(\.description))
            }
        }

        // Rules.
        func rule(_ chain: String, _ exprs: [NftExpr], comment: String?, text: String) -> NftOperation {
            NftOperation(kind: .newRule(NftRule(family: .inet, table: table, chain: chain, expressions: exprs,
                                                userdata: comment.map(Userdata.ruleComment))),
                         description: "adding rule to chain \(chain): \(text)",
                         expressionDescriptions: exprs.map(\.description))
        }
        for f in [IPFamily.ipv4, .ipv6] {
            ops.append(rule(outputChain, dispatchRule(f), comment: nil,
                            text: "\(f.nftKeyword) daddr . meta l4proto . th dport vmap @\(dispatchMap(f))"))
        }
        if masq {
            for f in [IPFamily.ipv4, .ipv6] {
                ops.append(rule(postroutingChain, masqueradeRule(f), comment: nil,
                                text: "ct status dnat ct original \(f.nftKeyword) daddr @\(masqueradeSet(f)) masquerade"))
            }
        }
        var nextID = firstAnonymousSetID
        for c in plan.targetChains {
            let dests = c.target.destinations
            let kw = c.family.nftKeyword
            let head = "meta l4proto \(c.protocol.lowercased) dnat \(kw) to "
            if dests.count == 1 {
                ops.append(rule(c.nftName, targetRule(family: c.family, protocol: c.protocol, destinations: dests),
                                comment: c.comment, text: head + "\(dests[0]) comment \"\(c.comment)\""))
            } else {
                let id = nextID
                nextID += 1
                let set = numgenMap(table, c.family, count: dests.count, id: id)
                let pairs = dests.enumerated().map { "\($0.offset) : \($0.element.ip) . \($0.element.port)" }
                ops.append(NftOperation(kind: .newSet(set), description: "adding anonymous map for chain \(c.nftName)"))
                ops += elementOperations(
                    set: set, kind: "anonymous map of chain \(c.nftName)",
                    elements: dests.enumerated().map { NftElement(key: Nft.hostOrder(UInt32($0.offset)), data: destinationData($0.element)) },
                    texts: pairs)
                ops.append(rule(c.nftName, targetRule(family: c.family, protocol: c.protocol, destinations: dests,
                                                      anonymousSetID: id),
                                comment: c.comment,
                                text: head + "numgen random mod \(dests.count) map { \(pairs.joined(separator: ", ")) } comment \"\(c.comment)\""))
            }
        }
        return ops
    }

    /// Splits elements over as many NEWSETELEM messages as their nested list needs.
    static func elementOperations(set: NftSet, kind: String, elements: [NftElement], texts: [String]) -> [NftOperation] {
        var ops: [NftOperation] = []
        var start = 0
        while start < elements.count {
            var size = 0
            var end = start
            while end < elements.count {
                let e = elements[end]
                // element nest + key nest + data/verdict nests + chain name, generously rounded.
                let cost = 64 + e.key.count + (e.data?.count ?? 0) + (e.verdict?.chain?.utf8.count ?? 0)
                if end > start && size + cost > elementListBudget { break }
                size += cost
                end += 1
            }
            let n = end - start
            let what = n == 1 ? "element \(texts[start])" : "\(n) elements (\(texts[start]) … \(texts[end - 1]))"
            ops.append(NftOperation(kind: .newElements(set, Array(elements[start..<end])),
                                    description: "adding \(what) to \(kind) \(set.name)",
                                    elementDescriptions: texts[start..<end].map { "adding element \($0) to \(kind) \(set.name)" }))
            start = end
        }
        return ops
    }
}
