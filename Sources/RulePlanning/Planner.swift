import KubeObjects
import NetAddress
import ServiceResolution

/// Mappings → one `RulePlan`: detects conflicts, orders everything, names the chains. Pure.
public struct Planner: Sendable {
    public let settings: PlanSettings

    public init(settings: PlanSettings = PlanSettings()) { self.settings = settings }

    public static func validate(_ settings: PlanSettings) throws(PlanningError) {
        func valid(_ s: String, max: Int) -> Bool {
            guard let first = s.unicodeScalars.first, s.unicodeScalars.count <= max,
                  first.properties.isASCIIHexDigit || (first.isASCII && first.properties.isAlphabetic) else { return false }
            return s.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "-" || $0 == "_") }
        }
        guard valid(settings.table, max: 64), settings.table.first!.isLetter else {
            throw .invalidSetting("--table \"\(settings.table)\": use 1-64 letters, digits, '-' or '_', starting with a letter")
        }
        guard valid(settings.chain, max: 23), settings.chain.first!.isLetter else {
            throw .invalidSetting("--chain \"\(settings.chain)\": use 1-23 letters, digits, '-' or '_', starting with a letter (iptables allows 28 characters and we add -MASQ)")
        }
        // Never name a chain that belongs to the kernel or to another tool: ours are flushed and replaced.
        let builtIn = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
        let foreignPrefixes = ["KUBE-", "DOCKER", "CNI-", "cali-", "HNDNAT-"]
        if builtIn.contains(settings.chain.uppercased()) || foreignPrefixes.contains(where: { settings.chain.hasPrefix($0) }) {
            throw .invalidSetting("--chain \"\(settings.chain)\" names a built-in chain or another tool's (KUBE-, DOCKER, CNI-, cali-) or our per-service chains (HNDNAT-); choose another name")
        }
        guard settings.priority >= Int(Int32.min), settings.priority <= Int(Int32.max) else {
            throw .invalidSetting("--priority \(settings.priority) is out of range")
        }
        // A nat chain at or below conntrack's priority is refused by the kernel (EOPNOTSUPP); say so here,
        // for every caller, before anything is sent.
        guard settings.priority > -200 else {
            throw .invalidSetting("--priority \(settings.priority): a nat chain needs a priority above -200 (where conntrack runs); the kernel refuses it")
        }
    }

    public func plan(_ resolution: Resolution, strategy: TargetStrategy) throws(PlanningError) -> RulePlan {
        try Planner.validate(settings)
        // Group by dispatch key; more than one distinct service on a key is a conflict.
        var byKey: [DispatchKey: [Mapping]] = [:]
        for m in resolution.mappings {
            byKey[DispatchKey(m), default: []].append(m)
        }
        var conflicts: [Conflict] = []
        var skipped = resolution.skipped
        var kept: [Mapping] = []
        kept.reserveCapacity(resolution.mappings.count)
        for (key, group) in byKey {
            if group.count == 1 { kept.append(group[0]); continue }
            let (conflict, items) = Planner.conflict(key, group)
            conflicts.append(conflict)
            skipped += items
        }
        conflicts.sort()
        if !conflicts.isEmpty && settings.onConflict == .fail {
            throw .conflicts(conflicts)
        }
        return assemble(kept: kept, skipped: skipped, conflicts: conflicts, warnings: resolution.warnings,
                        strategy: strategy)
    }

    /// The conflict on `key` and one skipped item per mapping that claims it.
    static func conflict(_ key: DispatchKey, _ group: [Mapping]) -> (Conflict, [SkippedItem]) {
        let names = Set(group.map { "\($0.service)" + ($0.portName.isEmpty ? "" : ":\($0.portName)") }).sorted()
        let conflict = Conflict(externalIP: key.ip, protocol: key.proto, port: key.port,
                                services: names.count > 1 ? names : names + names)
        let items = group.map { m in
            SkippedItem(service: m.service, port: m.portName.isEmpty ? String(m.port) : m.portName,
                        address: m.externalIP.description, code: .conflict, reason: "conflict: \(conflict)")
        }
        return (conflict, items)
    }

    /// A service port in one family: the identity of a target chain.
    struct ChainKey: Hashable {
        let service: ObjectName; let port: String; let proto: TransportProtocol; let family: IPFamily
        init(_ m: Mapping) { service = m.service; port = m.portName; proto = m.protocol; family = m.family }
    }

    /// Where a mapping's rule goes in the plan; `index` (its place in the input) keeps the sort stable.
    struct RuleOrderKey: Comparable {
        let address: IPAddress; let proto: TransportProtocol; let port: Int; let index: Int
        init(_ m: Mapping, index: Int) { address = m.externalIP; proto = m.protocol; port = m.port; self.index = index }
        static func < (a: RuleOrderKey, b: RuleOrderKey) -> Bool {
            (a.address, a.proto, a.port, a.index) < (b.address, b.proto, b.port, b.index)
        }
    }

    /// Where a target chain goes in the plan (chain keys are unique; `index` only makes the order total).
    struct ChainOrderKey: Comparable {
        let family: IPFamily; let service: ObjectName; let portName: String; let proto: TransportProtocol; let index: Int
        init(_ c: TargetChain, index: Int) {
            family = c.family; service = c.service; portName = c.portName; proto = c.protocol; self.index = index
        }
        static func < (a: ChainOrderKey, b: ChainOrderKey) -> Bool {
            (a.family, a.service, a.portName, a.proto, a.index) < (b.family, b.service, b.portName, b.proto, b.index)
        }
    }

    /// Conflict-free mappings → the ordered plan: rules sorted by family, address, protocol and port; one
    /// target chain per service port and family, sorted by family, service, port name and protocol.
    func assemble(kept unsorted: [Mapping], skipped: [SkippedItem], conflicts: [Conflict], warnings: [Diagnostic],
                  strategy: TargetStrategy) -> RulePlan {
        // Rules by address, protocol and port. Sorting small keys and gathering once is several times
        // cheaper than sorting the mappings themselves (each move copies a dozen fields and retains).
        var ruleOrder = unsorted.indices.map { RuleOrderKey(unsorted[$0], index: $0) }
        ruleOrder.sort()
        // Chains are made in rule order, so a chain's content comes from the first of its mappings in that
        // order whatever order they came in (a dictionary's, here). Mappings of one service port often sit
        // next to each other: comparing with the previous key skips most dictionary lookups.
        var chainIndex: [ChainKey: Int] = [:]
        var chains: [TargetChain] = []
        var chainOf = [Int](repeating: 0, count: unsorted.count)
        var previous: (key: ChainKey, index: Int)? = nil
        for key in ruleOrder {
            let i = key.index
            let ck = ChainKey(unsorted[i])
            if let previous, previous.key == ck { chainOf[i] = previous.index; continue }
            let index: Int
            if let known = chainIndex[ck] {
                index = known
            } else {
                index = chains.count
                chainIndex[ck] = index
                chains.append(targetChain(for: unsorted[i]))
            }
            chainOf[i] = index
            previous = (ck, index)
        }
        // Sort chains (by keys too, for the same reason) and remap the rules' indices.
        var chainOrder = chains.indices.map { ChainOrderKey(chains[$0], index: $0) }
        chainOrder.sort()
        var newIndex = [Int](repeating: 0, count: chains.count)
        for (new, key) in chainOrder.enumerated() { newIndex[key.index] = new }
        let sortedChains = chainOrder.map { chains[$0.index] }
        let rules = ruleOrder.map { PlannedRule(mapping: unsorted[$0.index], targetIndex: newIndex[chainOf[$0.index]]) }

        return RulePlan(settings: settings, strategy: strategy, rules: rules, targetChains: sortedChains,
                        skipped: skipped.sorted(), conflicts: conflicts, warnings: warnings)
    }

    /// The target chain of `m`'s service port and family (the one place a `TargetChain` is made).
    func targetChain(for m: Mapping) -> TargetChain {
        let named = chainName(for: m)
        return TargetChain(service: m.service, portName: m.portName, family: m.family, protocol: m.protocol,
                           iptablesName: named.iptablesName, comment: named.comment, target: m.target,
                           affinityTimeout: m.affinityTimeout)
    }

    func chainName(for m: Mapping) -> (iptablesName: String, comment: String) {
        let portLabel = m.portName.isEmpty ? String(m.port) : m.portName
        let identity = "\(m.family.rawValue)|\(m.service.namespace)/\(m.service.name):\(m.portName)|\(m.protocol.rawValue)"
        // The --chain prefix is part of the hash, so two instances with different --chain never share a chain.
        let hash = ServiceResolution.ChainHash.hash16(settings.chain + "|" + identity)
        return ("HNDNAT-\(hash)", RuleText.comment("\(m.service.namespace)/\(m.service.name):\(portLabel)"))
    }
}

/// Text that reaches a rule file. Kubernetes names are DNS labels, but input files are not validated by an
/// API server, so anything outside a small safe alphabet is replaced: no quote, backslash, newline or
/// other control character can ever reach nft or iptables-restore.
public enum RuleText {
    /// Safe in an nft comment (`comment "…"`) and in `-m comment --comment "…"`; at most 120 bytes.
    public static func comment(_ s: String) -> String {
        // Almost every comment is a short, plain `namespace/name:port`: returned as it is, without building
        // a new string (this runs once per target chain: 24k times at 10k Services).
        if s.utf8.count <= 120 && s.utf8.allSatisfy(isSafe) { return s }
        return String(String.UnicodeScalarView(s.unicodeScalars.prefix(120).map { u -> Unicode.Scalar in
            u.isASCII && isSafe(UInt8(u.value)) ? u : "_"
        }))
    }

    /// ASCII letters, digits and `./:_-= `.
    @inline(__always) static func isSafe(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "."), UInt8(ascii: "/"), UInt8(ascii: ":"), UInt8(ascii: "_"), UInt8(ascii: "-"), UInt8(ascii: "="),
             UInt8(ascii: " "):
            return true
        default:
            return false
        }
    }
}
