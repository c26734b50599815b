import NetAddress
import RulePlanning
import ServiceResolution

/// One dispatch entry as installed: `externalIP . proto . port : goto chain`, and what that chain does.
public struct InstalledMapping: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var externalIP: IPAddress
    public var `protocol`: TransportProtocol
    public var port: Int
    /// The target chain the dispatch map jumps to.
    public var chain: String
    /// The target rule's comment (`namespace/name:port`), nil when it has none.
    public var comment: String?
    /// Where connections go, in numgen index order; empty when the target chain could not be decoded
    /// (an anomaly then says why).
    public var destinations: [Destination]

    public init(externalIP: IPAddress, protocol: TransportProtocol, port: Int, chain: String, comment: String?,
                destinations: [Destination]) {
        self.externalIP = externalIP; self.protocol = `protocol`; self.port = port; self.chain = chain
        self.comment = comment; self.destinations = destinations
    }

    public static func < (a: InstalledMapping, b: InstalledMapping) -> Bool {
        if (a.externalIP, a.protocol, a.port) != (b.externalIP, b.protocol, b.port) {
            return (a.externalIP, a.protocol, a.port) < (b.externalIP, b.protocol, b.port)
        }
        return (a.chain, a.comment ?? "", a.destinations.map(\.description).joined(separator: ","))
            < (b.chain, b.comment ?? "", b.destinations.map(\.description).joined(separator: ","))
    }

    /// `203.0.113.10 tcp/443 -> 198.51.100.5:8443, 198.51.100.6:8443 (default/web:https)`
    public var description: String {
        let to = destinations.isEmpty ? "?" : destinations.map(\.description).joined(separator: ", ")
        return "\(externalIP) \(`protocol`.lowercased)/\(port) -> \(to)" + (comment.map { " (\($0))" } ?? "")
    }
}

/// What a hostnet-dnat table holds, decoded from the kernel (or derived from a plan with
/// `NftablesNetlink.expected(_:)`). Two values compare equal exactly when the installed ruleset does what
/// the plan says; everything that does not fit the ruleset contract is listed in `anomalies`.
public struct InstalledRuleset: Sendable, Hashable {
    public var table: String
    /// Priority of the nat output chain; nil when it is missing.
    public var outputPriority: Int?
    /// Priority of the masquerading postrouting chain; nil when masquerading is off (or the chain is missing).
    public var masqueradePriority: Int?
    /// Elements of masquerade4 and masquerade6, sorted.
    public var masqueradeAddresses: [IPAddress]
    /// Sorted.
    public var mappings: [InstalledMapping]
    /// Everything that deviates from docs/ruleset.md (unknown chains, rules, sets, undecodable targets), sorted.
    public var anomalies: [String]

    public init(table: String, outputPriority: Int?, masqueradePriority: Int?, masqueradeAddresses: [IPAddress],
                mappings: [InstalledMapping], anomalies: [String]) {
        self.table = table; self.outputPriority = outputPriority; self.masqueradePriority = masqueradePriority
        self.masqueradeAddresses = masqueradeAddresses.sorted(); self.mappings = mappings.sorted()
        self.anomalies = anomalies.sorted()
    }

    /// What applying `expected` over `self` changes, one line each: `+ …` is added, `- …` is removed, e.g.
    /// `+ 203.0.113.10 tcp/443 -> 198.51.100.5:8443 (default/web:https)`. Empty when they are equal.
    public func differences(to expected: InstalledRuleset) -> [String] {
        InstalledRuleset.differences(installed: self, expected: expected)
    }

    /// Like `differences(to:)`, with a missing table (`installed == nil`) shown as everything added.
    public static func differences(installed: InstalledRuleset?, expected: InstalledRuleset) -> [String] {
        var out: [String] = []
        guard let installed else {
            out.append("+ table inet \(expected.table)")
            return out + differences(installed: InstalledRuleset(table: expected.table, outputPriority: nil, masqueradePriority: nil,
                                                                 masqueradeAddresses: [], mappings: [], anomalies: []),
                                     expected: expected)
        }
        if installed.table != expected.table {
            out.append("- table inet \(installed.table)")
            out.append("+ table inet \(expected.table)")
        }
        if installed.outputPriority != expected.outputPriority {
            if let p = installed.outputPriority { out.append("- output chain priority \(p)") }
            if let p = expected.outputPriority { out.append("+ output chain priority \(p)") }
        }
        if installed.masqueradePriority != expected.masqueradePriority {
            if let p = installed.masqueradePriority { out.append("- masquerade chain priority \(p)") }
            if let p = expected.masqueradePriority { out.append("+ masquerade chain priority \(p)") }
        }
        let haveMasq = Set(installed.masqueradeAddresses), wantMasq = Set(expected.masqueradeAddresses)
        for a in (haveMasq.union(wantMasq)).sorted() where haveMasq.contains(a) != wantMasq.contains(a) {
            out.append("\(wantMasq.contains(a) ? "+" : "-") masquerade \(a)")
        }
        let have = Set(installed.mappings), want = Set(expected.mappings)
        for m in have.union(want).sorted() where have.contains(m) != want.contains(m) {
            out.append("\(want.contains(m) ? "+" : "-") \(m)")
        }
        let haveAnomalies = Set(installed.anomalies), wantAnomalies = Set(expected.anomalies)
        for a in haveAnomalies.union(wantAnomalies).sorted() where haveAnomalies.contains(a) != wantAnomalies.contains(a) {
            out.append("\(wantAnomalies.contains(a) ? "+" : "-") \(a)")
        }
        return out
    }
}

/// Everything dumped for one table, before interpretation.
struct DumpedTable {
    var table: NftTable
    var chains: [NftChain]
    var sets: [NftSet]
    var elements: [String: [NftElement]]
    var rules: [NftRule]
}

/// Interprets a dumped table against the ruleset contract. Pure.
enum RulesetDecoder {
    static func expected(_ plan: RulePlan) -> InstalledRuleset {
        let masq = plan.settings.masquerade
        let mappings = plan.rules.map { r -> InstalledMapping in
            let c = plan.targetChains[r.targetIndex]
            return InstalledMapping(externalIP: r.mapping.externalIP, protocol: r.mapping.protocol, port: r.mapping.port,
                                    chain: c.nftName, comment: c.comment, destinations: c.target.destinations)
        }
        return InstalledRuleset(table: plan.settings.table, outputPriority: plan.settings.priority,
                                masqueradePriority: masq ? Int(RulesetProgram.masqueradePriority) : nil,
                                masqueradeAddresses: masq ? plan.externalAddresses(.ipv4) + plan.externalAddresses(.ipv6) : [],
                                mappings: mappings, anomalies: [])
    }

    private static func render(_ exprs: [NftExpr]) -> String { "[ " + exprs.map(\.description).joined(separator: " ; ") + " ]" }

    static func decode(_ d: DumpedTable) -> InstalledRuleset {
        var anomalies: [String] = []
        let out = RulesetProgram.outputChain, post = RulesetProgram.postroutingChain
        let chains = Dictionary(d.chains.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let sets = Dictionary(d.sets.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var rulesByChain: [String: [NftRule]] = [:]
        for r in d.rules { rulesByChain[r.chain, default: []].append(r) }
        let t = d.table.name

        if d.table.flags != 0 { anomalies.append("table flags \(d.table.flags)") }

        // Base chains.
        func baseChain(_ name: String, hook: UInt32) -> Int? {
            guard let c = chains[name] else { return nil }
            guard let b = c.base, b.type == "nat", b.hook == hook else {
                anomalies.append("chain \(name) is not a nat base chain on hook \(hook == Nft.hookOutput ? "output" : "postrouting")")
                return nil
            }
            if b.policy != Nft.verdictAccept { anomalies.append("chain \(name) has policy \(b.policy)") }
            return Int(b.priority)
        }
        let outputPriority = baseChain(out, hook: Nft.hookOutput)
        if chains[out] == nil { anomalies.append("missing chain \(out)") }
        let masqueradePriority = baseChain(post, hook: Nft.hookPostrouting)

        func checkRules(_ chain: String, expected: [[NftExpr]], what: String) {
            guard chains[chain] != nil else { return }
            let have = (rulesByChain[chain] ?? []).map { $0.expressions.map(\.normalized) }
            let want = expected.map { $0.map(\.normalized) }
            if have != want {
                for r in have where !want.contains(r) { anomalies.append("chain \(chain): unexpected rule \(render(r))") }
                for (i, r) in want.enumerated() where !have.contains(r) { anomalies.append("chain \(chain): missing \(what) rule \(i + 1)") }
                if Set(have.map(render)) == Set(want.map(render)) { anomalies.append("chain \(chain): rules out of order") }
            }
            if let extra = (rulesByChain[chain] ?? []).first(where: { $0.userdata != nil }) {
                anomalies.append("chain \(chain): rule with userdata \(extra.comment ?? "?")")
            }
        }
        checkRules(out, expected: [RulesetProgram.dispatchRule(.ipv4), RulesetProgram.dispatchRule(.ipv6)], what: "dispatch")
        checkRules(post, expected: [RulesetProgram.masqueradeRule(.ipv4), RulesetProgram.masqueradeRule(.ipv6)], what: "masquerade")

        // Named sets.
        var known: Set<String> = []
        for f in [IPFamily.ipv4, .ipv6] {
            let name = RulesetProgram.dispatchMap(f)
            known.insert(name)
            guard let s = sets[name] else { anomalies.append("missing map \(name)"); continue }
            let want = RulesetProgram.dispatchSet(t, f, id: nil)
            if s.flags & ~UInt32(0x80) != want.flags || s.keyType != want.keyType || s.keyLength != want.keyLength
                || s.dataType != want.dataType {
                anomalies.append("map \(name) has an unexpected type")
            }
        }
        var masqueradeAddresses: [IPAddress] = []
        var masqueradeSets = 0
        for f in [IPFamily.ipv4, .ipv6] {
            let name = RulesetProgram.masqueradeSet(f)
            known.insert(name)
            guard let s = sets[name] else { continue }
            masqueradeSets += 1
            if s.isMap || s.keyLength != (f == .ipv4 ? 4 : 16) {
                anomalies.append("set \(name) has an unexpected type")
                continue
            }
            for e in d.elements[name] ?? [] {
                if let a = IPAddress(bytes: e.key), a.family == f { masqueradeAddresses.append(a) } else {
                    anomalies.append("set \(name): undecodable element")
                }
            }
        }
        if masqueradePriority != nil && masqueradeSets != 2 { anomalies.append("masquerade chain without both masquerade sets") }
        if masqueradePriority == nil && masqueradeSets != 0 { anomalies.append("masquerade sets without the masquerade chain") }

        // Target chains.
        struct Target { var family: IPFamily; var proto: TransportProtocol; var comment: String?; var destinations: [Destination] }
        var targets: [String: Target] = [:]
        var usedAnonymous: Set<String> = []
        for c in d.chains where c.name != out && c.name != post {
            if c.base != nil { anomalies.append("unexpected base chain \(c.name)"); continue }
            let rules = rulesByChain[c.name] ?? []
            guard rules.count == 1 else {
                anomalies.append("chain \(c.name): \(rules.count) rules instead of one target rule")
                continue
            }
            switch decodeTarget(rules[0], sets: sets, elements: d.elements) {
            case .success(let (family, proto, dests, anon)):
                targets[c.name] = Target(family: family, proto: proto, comment: rules[0].comment, destinations: dests)
                if let a = anon { usedAnonymous.insert(a) }
            case .failure(let why):
                anomalies.append("chain \(c.name): \(why.text)")
            }
        }

        // Dispatch entries.
        var mappings: [InstalledMapping] = []
        var referenced: Set<String> = []
        for f in [IPFamily.ipv4, .ipv6] {
            let name = RulesetProgram.dispatchMap(f)
            let addrLen = f == .ipv4 ? 4 : 16
            for e in d.elements[name] ?? [] {
                guard e.key.count == addrLen + 8, let ip = IPAddress(bytes: Array(e.key[0..<addrLen])),
                      let proto = TransportProtocol.allCases.first(where: { $0.number == e.key[addrLen] }) else {
                    anomalies.append("map \(name): undecodable element key \(e.key)")
                    continue
                }
                let port = Int(e.key[addrLen + 4]) << 8 | Int(e.key[addrLen + 5])
                let keyText = "\(ip) . \(proto.lowercased) . \(port)"
                guard let v = e.verdict, v.code == Nft.verdictGoto, let chain = v.chain else {
                    anomalies.append("map \(name): element \(keyText) is not a goto")
                    continue
                }
                referenced.insert(chain)
                guard let target = targets[chain] else {
                    if chains[chain] == nil { anomalies.append("map \(name): element \(keyText) jumps to missing chain \(chain)") }
                    mappings.append(InstalledMapping(externalIP: ip, protocol: proto, port: port, chain: chain, comment: nil, destinations: []))
                    continue
                }
                if target.family != f || target.proto != proto {
                    anomalies.append("map \(name): element \(keyText) jumps to chain \(chain), which translates \(target.family.rawValue) \(target.proto.lowercased)")
                }
                mappings.append(InstalledMapping(externalIP: ip, protocol: proto, port: port, chain: chain,
                                                 comment: target.comment, destinations: target.destinations))
            }
        }
        for c in d.chains where c.name != out && c.name != post && c.base == nil && !referenced.contains(c.name) {
            anomalies.append("chain \(c.name) is not used by any dispatch entry")
        }
        for s in d.sets where !known.contains(s.name) && !usedAnonymous.contains(s.name) {
            anomalies.append("unexpected \(s.isMap ? "map" : "set") \(s.name)")
        }
        return InstalledRuleset(table: t, outputPriority: outputPriority, masqueradePriority: masqueradePriority,
                                masqueradeAddresses: masqueradeAddresses, mappings: mappings, anomalies: anomalies)
    }

    struct Why: Error { var text: String }

    /// A target chain's single rule → family, protocol, destinations and the anonymous map it uses.
    static func decodeTarget(_ rule: NftRule, sets: [String: NftSet], elements: [String: [NftElement]])
        -> Result<(IPFamily, TransportProtocol, [Destination], String?), Why> {
        let e = rule.expressions
        let bad = Why(text: "not a hostnet-dnat target rule: \(render(e))")
        guard e.count >= 3, e[0] == .meta(key: Nft.metaL4Proto, dreg: Nft.reg1),
              case let .cmp(Nft.cmpEq, Nft.reg1, protoData) = e[1], protoData.count == 1,
              let proto = TransportProtocol.allCases.first(where: { $0.number == protoData[0] }),
              case let .nat(_, natFamily, _, _, _, _, _) = e.last! else { return .failure(bad) }
        let family: IPFamily
        switch natFamily {
        case UInt32(Nft.nfprotoIPv4): family = .ipv4
        case UInt32(Nft.nfprotoIPv6): family = .ipv6
        default: return .failure(bad)
        }
        let addrLen = family == .ipv4 ? 4 : 16
        var dests: [Destination] = []
        var anonymous: String?
        if case let .immediate(_, addr) = e[2], e.count == 5, case let .immediate(_, port) = e[3] {
            guard addr.count == addrLen, port.count == 2, let ip = IPAddress(bytes: addr) else { return .failure(bad) }
            dests = [Destination(ip: ip, port: Int(port[0]) << 8 | Int(port[1]))]
        } else if case let .numgen(_, modulus, _, _) = e[2], e.count == 5, case let .lookup(setName, _, _, _, _) = e[3] {
            guard let s = sets[setName], s.isAnonymous, s.isMap, s.keyLength == 4,
                  s.dataLength == UInt32(addrLen + 4) else {
                return .failure(Why(text: "numgen map \(setName) is missing or has an unexpected type"))
            }
            var byIndex: [UInt32: Destination] = [:]
            for el in elements[setName] ?? [] {
                guard let k = Nft.hostOrderValue(el.key), let data = el.data, data.count == addrLen + 4,
                      let ip = IPAddress(bytes: Array(data[0..<addrLen])), byIndex[k] == nil else {
                    return .failure(Why(text: "numgen map \(setName) has an undecodable element"))
                }
                byIndex[k] = Destination(ip: ip, port: Int(data[addrLen]) << 8 | Int(data[addrLen + 1]))
            }
            guard modulus >= 2, byIndex.count == Int(modulus), (0..<modulus).allSatisfy({ byIndex[$0] != nil }) else {
                return .failure(Why(text: "numgen mod \(modulus) does not match the \(byIndex.count) elements of map \(setName)"))
            }
            dests = (0..<modulus).map { byIndex[$0]! }
            anonymous = setName
        } else {
            return .failure(bad)
        }
        // Strict check: the rule must be exactly what we would have written for these destinations.
        let want = RulesetProgram.targetRule(family: family, protocol: proto, destinations: dests).map(\.normalized)
        guard e.map(\.normalized) == want else { return .failure(bad) }
        return .success((family, proto, dests, anonymous))
    }
}
