import KubeObjects
import NetAddress
import ServiceResolution

/// Names and knobs shared by every backend. Defaults put our nat output chain at priority -99: after
/// kube-proxy (-100), so we only catch what nothing else translated. -101 takes over instead.
public struct PlanSettings: Sendable, Hashable {
    /// nftables table name (`table inet <table>`).
    public var table: String
    /// iptables chain that OUTPUT jumps to; the masquerade chain is `<chain>-MASQ`.
    public var chain: String
    public var priority: Int
    public var masquerade: Bool
    public var onConflict: ConflictPolicy

    public init(table: String = "hostnet-dnat", chain: String = "HOSTNET-DNAT", priority: Int = -99,
                masquerade: Bool = true, onConflict: ConflictPolicy = .fail) {
        self.table = table; self.chain = chain; self.priority = priority
        self.masquerade = masquerade; self.onConflict = onConflict
    }

    public var masqueradeChain: String { "\(chain)-MASQ" }
    /// iptables can only order relative to kube-proxy's jump: before it (insert) or after it (append).
    public var runsBeforeKubeProxy: Bool { priority < -100 }
}

public enum ConflictPolicy: String, Sendable, Hashable, CaseIterable {
    /// Stop with an error naming both services.
    case fail
    /// Map neither service for that address, and report both.
    case skip
}

/// Two or more services claim the same external IP, protocol and port.
public struct Conflict: Sendable, Hashable, Comparable, CustomStringConvertible {
    public let externalIP: IPAddress
    public let `protocol`: TransportProtocol
    public let port: Int
    public let services: [String]

    public static func < (a: Conflict, b: Conflict) -> Bool {
        (a.externalIP, a.protocol, a.port) < (b.externalIP, b.protocol, b.port)
    }

    public var description: String {
        "\(externalIP.bracketed):\(port)/\(`protocol`.rawValue) is claimed by \(services.joined(separator: " and "))"
    }
}

/// Where matched connections go: one per service port and family, shared by all of its external IPs.
/// iptables gives each its own chain; nftables keeps the destinations in a data map (docs/ruleset.md).
public struct TargetChain: Sendable, Hashable {
    public let service: ObjectName
    /// The port's name, or empty for an unnamed port.
    public let portName: String
    public let family: IPFamily
    public let `protocol`: TransportProtocol
    /// iptables chain (at most 28 characters), e.g. `HNDNAT-K3XH2Q...`.
    public let iptablesName: String
    /// `namespace/name:port`, already safe for a rule file.
    public let comment: String
    public let target: MappingTarget
    /// `sessionAffinity: ClientIP` timeout in seconds, for endpoint targets; nil: a random pick per connection.
    public let affinityTimeout: Int?

    public init(service: ObjectName, portName: String, family: IPFamily, protocol: TransportProtocol, iptablesName: String,
                comment: String, target: MappingTarget, affinityTimeout: Int? = nil) {
        self.service = service; self.portName = portName; self.family = family; self.protocol = `protocol`
        self.iptablesName = iptablesName; self.comment = comment; self.target = target; self.affinityTimeout = affinityTimeout
    }

    /// The name of the affinity list of one destination: the nft set of client addresses that stick to it and
    /// the iptables `recent` list. Named after the destination, not its slot, so that a client keeps its
    /// endpoint when other endpoints come and go (an incremental update keeps the set).
    public func affinityName(_ d: Destination) -> String {
        "\(iptablesName)-\(ChainHash.hash16(iptablesName + "|" + d.description))"
    }
}

extension TargetChain {
    /// A jump into kube-proxy's own `KUBE-SVC-…` chain rather than a DNAT of ours.
    public var isKubeProxyJump: Bool {
        if case .kubeProxyChain = target { return true }
        return false
    }
}

extension TargetChain {
    /// The rules of this target chain's nft affinity chain (docs/ruleset.md), as nft text: a client found in
    /// a destination's set goes back to it; otherwise a random pick (kube-proxy's statistic cascade: rule i
    /// matches with probability 1/(N-i)). Every rule that translates refreshes the client in that
    /// destination's set. Shared by the nft renderer and the netlink backend's descriptions.
    public var nftAffinityRules: [String] {
        let fam = family.nftKeyword
        let proto = "meta l4proto \(self.protocol.lowercased)"
        let dests = target.destinations
        func translate(_ d: Destination) -> String {
            "update @\(affinityName(d)) { \(fam) saddr } dnat \(fam) to \(d)"
        }
        var lines = dests.map { "\(proto) \(fam) saddr @\(affinityName($0)) \(translate($0))" }
        for (i, d) in dests.enumerated() {
            let remaining = dests.count - i
            lines.append(remaining > 1 ? "\(proto) numgen random mod \(remaining) 0 \(translate(d))" : "\(proto) \(translate(d))")
        }
        return lines
    }
}

/// One dispatch entry: `externalIP . protocol . port → goto <target chain>`.
public struct PlannedRule: Sendable, Hashable {
    public let mapping: Mapping
    /// Index into `RulePlan.targetChains`.
    public let targetIndex: Int
}

/// Everything a backend needs, in one deterministic value: the same input in any order gives an identical
/// plan, so rendered files are byte-identical and applying twice changes nothing.
public struct RulePlan: Sendable {
    public let settings: PlanSettings
    /// The strategy asked for (`auto` stays `auto`; each target chain says what it does).
    public let strategy: TargetStrategy
    /// Sorted by family, external IP, protocol number and port.
    public let rules: [PlannedRule]
    /// Sorted by family, service, port name and protocol.
    public let targetChains: [TargetChain]
    public let skipped: [SkippedItem]
    /// Conflicts resolved by `--on-conflict skip` (with `fail` the planner throws instead).
    public let conflicts: [Conflict]
    public let warnings: [Diagnostic]

    /// External addresses whose DNATed connections are masqueraded, per family, sorted.
    public func externalAddresses(_ family: IPFamily) -> [IPAddress] {
        var out: [IPAddress] = []
        for r in rules where r.mapping.family == family {
            if out.last != r.mapping.externalIP { out.append(r.mapping.externalIP) }
        }
        return out  // rules are sorted by address within a family, so adjacent duplicates suffice
    }

    public func rules(_ family: IPFamily) -> [PlannedRule] { rules.filter { $0.mapping.family == family } }
    /// The rules of one family with source ranges (`ranged`) or without.
    public func rules(_ family: IPFamily, ranged: Bool) -> [PlannedRule] {
        rules.filter { $0.mapping.family == family && $0.mapping.sourceRanges.isEmpty != ranged }
    }

    /// Some mapping has `loadBalancerSourceRanges`: the nft table then has the ranged4/6 maps and their rules.
    public var hasSourceRanges: Bool { rules.contains { !$0.mapping.sourceRanges.isEmpty } }

    /// The nft chain a dispatch entry jumps to: the shared pick chain, or the target chain's own affinity chain.
    public func nftChain(of rule: PlannedRule) -> String {
        let chain = targetChains[rule.targetIndex]
        if chain.affinityTimeout != nil { return chain.iptablesName }
        return NftPickChain(family: rule.mapping.family, protocol: rule.mapping.protocol,
                            count: rule.mapping.target.destinationCount).name
    }

    /// Target chains with ClientIP affinity: each gets its own nft chain and one affinity set per destination.
    public var affinityChains: [TargetChain] {
        targetChains.filter { $0.affinityTimeout != nil && $0.target.destinationCount > 0 && !$0.isKubeProxyJump }
    }

    /// The comment that marks an nftables table as ours: apply and remove refuse a table without it, so
    /// they never replace or delete another tool's table (firewalld's, say).
    public static let nftOwnershipComment = "managed by hostnet-dnat"

    /// Why nftables cannot carry this plan, or nil: a table cannot jump into kube-proxy's iptables chains.
    public var nftablesRefusal: String? {
        guard let chain = targetChains.first(where: \.isKubeProxyJump) else { return nil }
        return "--target kube-proxy jumps into kube-proxy's iptables KUBE-SVC-… chains (e.g. for \(chain.comment)), "
            + "which an nftables table cannot reach; use --format iptables / --backend iptables, or --target endpoints"
    }
    public func targetChains(_ family: IPFamily) -> [TargetChain] { targetChains.filter { $0.family == family } }

    /// The nftables "pick" chains this plan needs: one per family, protocol and number of destinations,
    /// sorted by family, protocol number and count (see docs/ruleset.md). Empty for kube-proxy targets.
    public var nftPickChains: [NftPickChain] {
        var seen = Set<NftPickChain>()
        for r in rules where targetChains[r.targetIndex].affinityTimeout == nil {
            let n = r.mapping.target.destinationCount
            if n > 0 { seen.insert(NftPickChain(family: r.mapping.family, protocol: r.mapping.protocol, count: n)) }
        }
        return seen.sorted()
    }
}

/// A shared nft chain that picks one of `count` destinations at random for connections of one family and
/// protocol: `dnat … to daddr . l4proto . dport . numgen random mod count map @endpoints<f>`.
public struct NftPickChain: Sendable, Hashable, Comparable {
    public let family: IPFamily
    public let `protocol`: TransportProtocol
    public let count: Int

    public init(family: IPFamily, protocol: TransportProtocol, count: Int) {
        self.family = family; self.protocol = `protocol`; self.count = count
    }

    /// `pick4-tcp-3`.
    public var name: String { "pick\(family == .ipv4 ? "4" : "6")-\(`protocol`.lowercased)-\(count)" }

    public static func < (a: NftPickChain, b: NftPickChain) -> Bool {
        (a.family, a.protocol, a.count) < (b.family, b.protocol, b.count)
    }
}

public enum PlanningError: Error, Sendable, Equatable, CustomStringConvertible {
    case conflicts([Conflict])
    case invalidSetting(String)

    public var description: String {
        switch self {
        case .conflicts(let c):
            let lines = c.prefix(20).map { "  \($0)" }.joined(separator: "\n")
            let more = c.count > 20 ? "\n  … and \(c.count - 20) more" : ""
            return "\(c.count) external address conflict(s); use --on-conflict skip to map neither side:\n\(lines)\(more)"
        case .invalidSetting(let s):
            return s
        }
    }
}

/// `external IP . protocol . port`: what a connection is dispatched on. At most one mapping per key.
public struct DispatchKey: Sendable, Hashable, Comparable, CustomStringConvertible {
    public let ip: IPAddress
    public let proto: TransportProtocol
    public let port: Int

    public init(ip: IPAddress, proto: TransportProtocol, port: Int) { self.ip = ip; self.proto = proto; self.port = port }
    public init(_ m: Mapping) { self.init(ip: m.externalIP, proto: m.protocol, port: m.port) }

    public static func < (a: DispatchKey, b: DispatchKey) -> Bool { (a.ip, a.proto, a.port) < (b.ip, b.proto, b.port) }
    public var description: String { "\(ip.bracketed):\(port)/\(proto.lowercased)" }
}

extension RulePlan {
    /// Whether some target chain jumps into kube-proxy's chains (read in place, as `hasRules`).
    public var hasKubeProxyJumps: Bool {
        targetChains.withUnsafeBufferPointer { cs in cs.indices.contains { cs[$0].isKubeProxyJump } }
    }

    /// Whether any rule is of `family` (without building the filtered list `rules(_:)` returns).
    public func hasRules(_ family: IPFamily) -> Bool {
        rules.withUnsafeBufferPointer { rs in rs.indices.contains { rs[$0].mapping.family == family } }  // in place, no copies
    }
}
