import NetAddress
import RulePlanning
import ServiceResolution

/// One dispatch entry as installed: `externalIP . proto . port comment "…" : goto pick<f>-<proto>-<N>`, and
/// the endpoints it picks from (elements `externalIP . proto . port . 0 … N-1` of the endpoints map).
public struct InstalledMapping: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var externalIP: IPAddress
    public var `protocol`: TransportProtocol
    public var port: Int
    /// The pick chain the dispatch entry jumps to (`pick4-tcp-3`).
    public var chain: String
    /// The dispatch element's comment (`namespace/name:port`), nil when it has none.
    public var comment: String?
    /// Where connections go, in slot order (0 … N-1); empty when the pick chain or the slots could not be
    /// decoded (an anomaly then says why).
    public var destinations: [Destination]
    /// The source blocks of a `ranged4/6` entry, sorted; empty for a `dispatch4/6` entry (every source).
    public var sourceRanges: [CIDR]
    /// The timeout of the affinity sets, when the entry jumps to an affinity chain.
    public var affinityTimeout: Int?

    public init(externalIP: IPAddress, protocol: TransportProtocol, port: Int, chain: String, comment: String?,
                destinations: [Destination], sourceRanges: [CIDR] = [], affinityTimeout: Int? = nil) {
        self.externalIP = externalIP; self.protocol = `protocol`; self.port = port; self.chain = chain
        self.comment = comment; self.destinations = destinations
        self.sourceRanges = sourceRanges; self.affinityTimeout = affinityTimeout
    }

    public static func < (a: InstalledMapping, b: InstalledMapping) -> Bool {
        if (a.externalIP, a.protocol, a.port) != (b.externalIP, b.protocol, b.port) {
            return (a.externalIP, a.protocol, a.port) < (b.externalIP, b.protocol, b.port)
        }
        return (a.chain, a.comment ?? "", a.destinations.map(\.description).joined(separator: ","), a.extras)
            < (b.chain, b.comment ?? "", b.destinations.map(\.description).joined(separator: ","), b.extras)
    }

    private var extras: String {
        var out = ""
        if !sourceRanges.isEmpty { out += " from \(sourceRanges.map(\.description).joined(separator: ", "))" }
        if let t = affinityTimeout { out += " affinity ClientIP \(t)s" }
        return out
    }

    /// `203.0.113.10 tcp/443 -> 198.51.100.5:8443, 198.51.100.6:8443 (default/web:https)`, with
    /// ` from 203.0.113.0/25` and ` affinity ClientIP 10800s` when the entry has them.
    public var description: String {
        let to = destinations.isEmpty ? "?" : destinations.map(\.description).joined(separator: ", ")
        return "\(externalIP) \(`protocol`.lowercased)/\(port) -> \(to)" + extras + (comment.map { " (\($0))" } ?? "")
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
            let m = r.mapping
            let chain = plan.targetChains[r.targetIndex]
            return InstalledMapping(externalIP: m.externalIP, protocol: m.protocol, port: m.port, chain: plan.nftChain(of: r),
                                    comment: chain.comment, destinations: m.target.destinations,
                                    sourceRanges: m.sourceRanges, affinityTimeout: chain.affinityTimeout)
        }
        return InstalledRuleset(table: plan.settings.table, outputPriority: plan.settings.priority,
                                masqueradePriority: masq ? Int(RulesetProgram.masqueradePriority) : nil,
                                masqueradeAddresses: masq ? plan.externalAddresses(.ipv4) + plan.externalAddresses(.ipv6) : [],
                                mappings: mappings, anomalies: [])
    }

    /// The anomaly of a table without our comment: apply and remove refuse it (another tool's table, or one
    /// left by a hostnet-dnat version that did not mark its table yet).
    static func notOursAnomaly(_ t: NftTable) -> String {
        "table \(t.family) \(t.name) was not created by hostnet-dnat (no comment \"\(RulesetProgram.ownershipComment)\""
            + (t.comment.map { "; its comment is \"\($0)\"" } ?? "") + ")"
    }

    private static func render(_ exprs: [NftExpr]) -> String { "[ " + exprs.map(\.description).joined(separator: " ; ") + " ]" }

    private static func family(_ f: IPFamily) -> String { f == .ipv4 ? "ip" : "ip6" }

    /// `addr . proto . port` of a dispatch or endpoints key, with what follows it (the slot).
    struct Key: Hashable {
        var ip: IPAddress
        var proto: TransportProtocol
        var port: Int
        var text: String { "\(ip) . \(proto.lowercased) . \(port)" }
    }

    static func decodeKey(_ b: [UInt8], addressLength n: Int, extra: Int) -> (Key, ArraySlice<UInt8>)? {
        guard b.count == n + 8 + extra, let ip = IPAddress(bytes: Array(b[0..<n])),
              b[(n + 1)..<(n + 4)].allSatisfy({ $0 == 0 }), b[n + 6] == 0, b[n + 7] == 0,
              let proto = TransportProtocol.allCases.first(where: { $0.number == b[n] }) else { return nil }
        return (Key(ip: ip, proto: proto, port: Int(b[n + 4]) << 8 | Int(b[n + 5])), b[(n + 8)...])
    }

    static func decodeDestination(_ b: [UInt8]?, addressLength n: Int) -> Destination? {
        guard let b, b.count == n + 4, b[n + 2] == 0, b[n + 3] == 0, let ip = IPAddress(bytes: Array(b[0..<n])) else { return nil }
        return Destination(ip: ip, port: Int(b[n]) << 8 | Int(b[n + 1]))
    }

    static func decode(_ d: DumpedTable) -> InstalledRuleset {
        var anomalies: [String] = []
        let out = RulesetProgram.outputChain, post = RulesetProgram.postroutingChain
        let chains = Dictionary(d.chains.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        let sets = Dictionary(d.sets.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var rulesByChain: [String: [NftRule]] = [:]
        for r in d.rules { rulesByChain[r.chain, default: []].append(r) }
        let t = d.table.name
        let families: [IPFamily] = [.ipv4, .ipv6]

        if d.table.flags != 0 { anomalies.append("table flags \(d.table.flags)") }
        if d.table.comment != RulesetProgram.ownershipComment { anomalies.append(notOursAnomaly(d.table)) }

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
        let ranged = sets[RulesetProgram.rangedMap(.ipv4)] != nil || sets[RulesetProgram.rangedMap(.ipv6)] != nil
        checkRules(out, expected: [RulesetProgram.dispatchRule(.ipv4), RulesetProgram.dispatchRule(.ipv6)]
                   + (ranged ? [RulesetProgram.rangedRule(.ipv4), RulesetProgram.rangedRule(.ipv6)] : []), what: "dispatch")
        checkRules(post, expected: [RulesetProgram.masqueradeRule(.ipv4), RulesetProgram.masqueradeRule(.ipv6)], what: "masquerade")

        // Named maps and sets.
        var known: Set<String> = []
        func checkMap(_ want: NftSet) {
            known.insert(want.name)
            guard let s = sets[want.name] else { anomalies.append("missing map \(want.name)"); return }
            if s.flags & ~UInt32(0x80) != want.flags & ~UInt32(0x80) || s.keyType != want.keyType || s.keyLength != want.keyLength
                || s.dataType != want.dataType || (want.dataType != Nft.dataVerdict && s.dataLength != want.dataLength) {
                anomalies.append("map \(want.name) has an unexpected type")
            }
        }
        for f in families {
            checkMap(RulesetProgram.dispatchSet(t, f, id: nil))
            checkMap(RulesetProgram.endpointsSet(t, f, id: nil))
            if ranged { checkMap(RulesetProgram.rangedSet(t, f, id: nil)) }
        }
        var masqueradeAddresses: [IPAddress] = []
        var masqueradeSets = 0
        for f in families {
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

        // Pick chains: one rule each, `meta l4proto <p> dnat … numgen random mod <N> map @endpoints<f>`.
        struct Pick { var family: IPFamily; var proto: TransportProtocol; var modulus: UInt32 }
        var picks: [String: Pick] = [:]
        var affinityChains: [String: Affinity] = [:]
        for c in d.chains where c.name != out && c.name != post {
            if c.base != nil { anomalies.append("unexpected base chain \(c.name)"); continue }
            let rules = rulesByChain[c.name] ?? []
            if c.name.hasPrefix("HNDNAT-") {
                switch decodeAffinity(c.name, rules, sets: sets) {
                case .success(let a):
                    affinityChains[c.name] = a
                    known.formUnion(a.sets)
                case .failure(let why):
                    anomalies.append("chain \(c.name): \(why.message)")
                }
                continue
            }
            guard rules.count == 1 else {
                anomalies.append("chain \(c.name): \(rules.count) rules instead of one pick rule")
                continue
            }
            guard let p = decodePick(rules[0]) else {
                anomalies.append("chain \(c.name): not a hostnet-dnat pick rule: \(render(rules[0].expressions))")
                continue
            }
            if rules[0].userdata != nil { anomalies.append("chain \(c.name): rule with userdata \(rules[0].comment ?? "?")") }
            let canonical = NftPickChain(family: p.family, protocol: p.proto, count: Int(p.modulus)).name
            if c.name != canonical {
                anomalies.append("chain \(c.name) picks among \(p.modulus) \(family(p.family)) \(p.proto.lowercased) endpoints (its name should be \(canonical))")
            }
            picks[c.name] = Pick(family: p.family, proto: p.proto, modulus: p.modulus)
        }

        for s in d.sets where !known.contains(s.name) {
            anomalies.append("unexpected \(s.isMap ? "map" : "set") \(s.name)")
        }

        // Endpoint slots, by dispatch key.
        var slots: [IPFamily: [Key: [UInt32: Destination]]] = [:]
        for f in families {
            let name = RulesetProgram.endpointsMap(f)
            let n = f == .ipv4 ? 4 : 16
            var byKey: [Key: [UInt32: Destination]] = [:]
            var undecodable = 0
            for e in d.elements[name] ?? [] {
                guard let (key, rest) = decodeKey(e.key, addressLength: n, extra: 4), let slot = Nft.hostOrderValue(rest),
                      let dest = decodeDestination(e.data, addressLength: n) else {
                    undecodable += 1
                    continue
                }
                byKey[key, default: [:]][slot] = dest
            }
            if undecodable > 0 { anomalies.append("map \(name): \(undecodable) undecodable element(s)") }
            slots[f] = byKey
        }

        // Dispatch entries.
        var mappings: [InstalledMapping] = []
        var referenced: Set<String> = []
        for f in families {
            let name = RulesetProgram.dispatchMap(f), endpoints = RulesetProgram.endpointsMap(f)
            let n = f == .ipv4 ? 4 : 16
            var used: Set<Key> = []
            // (key, verdict, comment, source ranges) of the dispatch entries, then of the ranged entries grouped by key.
            var entries: [(key: Key, verdict: NftVerdict?, comment: String?, ranges: [CIDR], map: String)] = []
            for e in d.elements[name] ?? [] {
                guard let (key, _) = decodeKey(e.key, addressLength: n, extra: 0) else {
                    anomalies.append("map \(name): undecodable element key \(e.key)")
                    continue
                }
                entries.append((key, e.verdict, e.comment, [], name))
            }
            let rangedName = RulesetProgram.rangedMap(f)
            var rangedIndex: [Key: Int] = [:]
            for e in d.elements[rangedName] ?? [] {
                guard let (key, start) = decodeKey(e.key, addressLength: n, extra: n), let end = e.keyEnd,
                      let (keyEnd, last) = decodeKey(end, addressLength: n, extra: n), keyEnd == key,
                      let first = IPAddress(bytes: Array(start)), let lastIP = IPAddress(bytes: Array(last)),
                      let block = CIDR(first: first, last: lastIP) else {
                    anomalies.append("map \(rangedName): undecodable element (not one address . protocol . port . CIDR block)")
                    continue
                }
                if let i = rangedIndex[key] {
                    if entries[i].verdict != e.verdict || entries[i].comment != e.comment {
                        anomalies.append("map \(rangedName): the blocks of \(key.text) lead to different chains or comments")
                    }
                    entries[i].ranges.append(block)
                } else {
                    rangedIndex[key] = entries.count
                    entries.append((key, e.verdict, e.comment, [block], rangedName))
                }
            }
            for entry in entries {
                let key = entry.key, name = entry.map
                guard let v = entry.verdict, v.code == Nft.verdictGoto, let chain = v.chain else {
                    anomalies.append("map \(name): element \(key.text) is not a goto")
                    continue
                }
                if name == rangedName && rangedIndex[key] != nil && d.elements[RulesetProgram.dispatchMap(f)]?.contains(where: {
                    decodeKey($0.key, addressLength: n, extra: 0)?.0 == key }) == true {
                    anomalies.append("map \(name): \(key.text) is also in \(RulesetProgram.dispatchMap(f)), which takes it for every source")
                }
                referenced.insert(chain)
                var mapping = InstalledMapping(externalIP: key.ip, protocol: key.proto, port: key.port, chain: chain,
                                               comment: entry.comment, destinations: [],
                                               sourceRanges: entry.ranges.sorted { ($0.address, $0.prefixLength) < ($1.address, $1.prefixLength) })
                defer { mappings.append(mapping) }
                if let a = affinityChains[chain] {
                    if a.family != f || a.proto != key.proto {
                        anomalies.append("map \(name): element \(key.text) jumps to chain \(chain), which translates \(family(a.family)) \(a.proto.lowercased)")
                    } else {
                        mapping.destinations = a.destinations
                        mapping.affinityTimeout = a.timeout
                    }
                    continue
                }
                used.insert(key)
                guard let pick = picks[chain] else {
                    if chains[chain] == nil { anomalies.append("map \(name): element \(key.text) jumps to missing chain \(chain)") }
                    continue
                }
                if pick.family != f || pick.proto != key.proto {
                    anomalies.append("map \(name): element \(key.text) jumps to chain \(chain), which translates \(family(pick.family)) \(pick.proto.lowercased)")
                    continue
                }
                let have = slots[f]?[key] ?? [:]
                let m = pick.modulus
                // (At most have.count slots can be present: a modulus beyond that is missing some, however large.)
                if UInt64(m) <= UInt64(have.count), case let dests = (0..<m).compactMap({ have[$0] }), dests.count == Int(m) {
                    mapping.destinations = dests
                } else {
                    var missing: [String] = []
                    var s: UInt32 = 0
                    while s < m && missing.count < 5 { if have[s] == nil { missing.append(String(s)) }; s += 1 }
                    if s < m { missing.append("…") }
                    anomalies.append("map \(endpoints): element \(key.text) (numgen mod \(m) in chain \(chain)) has no slot \(missing.joined(separator: ", "))")
                }
                let beyond = have.keys.filter { $0 >= pick.modulus }.sorted()
                if !beyond.isEmpty {
                    anomalies.append("map \(endpoints): slot(s) \(beyond.map(String.init).joined(separator: ", ")) of \(key.text) are never picked (numgen mod \(pick.modulus) in chain \(chain))")
                }
            }
            let orphans = (slots[f] ?? [:]).keys.filter { !used.contains($0) }
            for k in orphans.sorted(by: { ($0.ip, $0.proto, $0.port) < ($1.ip, $1.proto, $1.port) }) {
                anomalies.append("map \(endpoints): elements for \(k.text) have no dispatch entry")
            }
        }
        for c in d.chains where c.name != out && c.name != post && c.base == nil && !referenced.contains(c.name) {
            anomalies.append("chain \(c.name) is not used by any dispatch entry")
        }
        return InstalledRuleset(table: t, outputPriority: outputPriority, masqueradePriority: masqueradePriority,
                                masqueradeAddresses: masqueradeAddresses, mappings: mappings, anomalies: anomalies)
    }

    /// An affinity chain as decoded: what it translates, and its destinations' sets.
    struct Affinity {
        var family: IPFamily
        var proto: TransportProtocol
        var destinations: [Destination]
        var timeout: Int
        var sets: [String]
    }

    struct DecodeFailure: Error { var message: String }

    /// An affinity chain's rules → family, protocol, destinations and timeout, when they are exactly the rules
    /// we write for them (docs/ruleset.md) and every set they name is a dynamic set of that timeout.
    static func decodeAffinity(_ chain: String, _ rules: [NftRule], sets: [String: NftSet]) -> Result<Affinity, DecodeFailure> {
        let n = rules.count / 2
        guard n >= 1, rules.count == 2 * n else {
            return .failure(DecodeFailure(message: "\(rules.count) rules: not a hostnet-dnat affinity chain (two per destination)"))
        }
        var names: [String] = [], dests: [Destination] = []
        var family: IPFamily? = nil, proto: TransportProtocol? = nil
        for r in rules.prefix(n) {
            let e = r.expressions
            guard e.count == 11, case let .cmp(_, _, p) = e[1], p.count == 1,
                  let tp = TransportProtocol.allCases.first(where: { $0.number == p[0] }),
                  case let .lookup(set, _, _, nil, _) = e[5],
                  case let .immediate(_, addr) = e[8], case let .immediate(_, port) = e[9], port.count == 2,
                  let ip = IPAddress(bytes: addr), case let .nat(_, natFamily, _, _, _, _, _) = e[10],
                  natFamily == UInt32(ip.family == .ipv4 ? Nft.nfprotoIPv4 : Nft.nfprotoIPv6) else {
                return .failure(DecodeFailure(message: "not a hostnet-dnat affinity rule: [ \(r.expressions.map(\.description).joined(separator: " ; ")) ]"))
            }
            if family == nil { family = ip.family; proto = tp }
            guard family == ip.family, proto == tp else { return .failure(DecodeFailure(message: "destinations of different families or protocols")) }
            names.append(set)
            dests.append(Destination(ip: ip, port: Int(port[0]) << 8 | Int(port[1])))
        }
        let want = RulesetProgram.affinityRules(family: family!, protocolNumber: proto!.number, destinations: dests,
                                                sets: names.map { ($0, nil) }).map { $0.map(\.normalized) }
        guard rules.map({ $0.expressions.map(\.normalized) }) == want else {
            return .failure(DecodeFailure(message: "rules differ from the affinity chain hostnet-dnat writes for \(dests.map(\.description).joined(separator: ", "))"))
        }
        var timeouts = Set<UInt64>()
        for (name, d) in zip(names, dests) {
            guard name == "\(chain)-\(ChainHash.hash16(chain + "|" + d.description))" else {
                return .failure(DecodeFailure(message: "set \(name) is not the affinity set of \(d)"))
            }
            guard let s = sets[name], s.flags & (Nft.setTimeout | Nft.setEval) == Nft.setTimeout | Nft.setEval, !s.isMap,
                  s.keyLength == (family == .ipv4 ? 4 : 16), let t = s.timeout, t > 0 else {
                return .failure(DecodeFailure(message: "set \(name) is missing or not a dynamic set with a timeout"))
            }
            timeouts.insert(t)
        }
        guard timeouts.count == 1, let ms = timeouts.first, ms % 1000 == 0 else {
            return .failure(DecodeFailure(message: "affinity sets with different or fractional timeouts"))
        }
        return .success(Affinity(family: family!, proto: proto!, destinations: dests, timeout: Int(ms / 1000), sets: names))
    }

    /// A pick chain's rule → family, protocol and modulus, when it is exactly the rule we write for them.
    static func decodePick(_ rule: NftRule) -> (family: IPFamily, proto: TransportProtocol, modulus: UInt32)? {
        let e = rule.expressions
        guard e.count == 10, case let .cmp(_, _, protoData) = e[1], protoData.count == 1,
              let proto = TransportProtocol.allCases.first(where: { $0.number == protoData[0] }),
              case let .numgen(_, modulus, _, _) = e[7], modulus >= 1,
              case let .nat(_, natFamily, _, _, _, _, _) = e[9] else { return nil }
        let family: IPFamily
        switch natFamily {
        case UInt32(Nft.nfprotoIPv4): family = .ipv4
        case UInt32(Nft.nfprotoIPv6): family = .ipv6
        default: return nil
        }
        let want = RulesetProgram.pickRule(family: family, protocolNumber: proto.number, modulus: modulus).map(\.normalized)
        guard e.map(\.normalized) == want else { return nil }
        return (family, proto, modulus)
    }
}
