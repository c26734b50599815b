// Which conntrack entries a plan change leaves stale, and how an entry is matched against them. Pure: no
// kernel, no C. `ConntrackTable` (Conntrack.swift) reads the table and deletes what matches.
import KubeObjects
import NetAddress
import RulePlanning
import ServiceResolution

/// One direction of a conntrack entry, as the kernel keys it (`CTA_TUPLE_ORIG` / `CTA_TUPLE_REPLY`).
public struct ConntrackTuple: Sendable, Hashable, CustomStringConvertible {
    public var source: IPAddress
    public var destination: IPAddress
    /// IANA protocol number (17 for UDP).
    public var protocolNumber: UInt8
    /// Ports for TCP, UDP, SCTP (and the like); nil for protocols without ports.
    public var sourcePort: Int?
    public var destinationPort: Int?

    public init(source: IPAddress, destination: IPAddress, protocolNumber: UInt8, sourcePort: Int?, destinationPort: Int?) {
        self.source = source; self.destination = destination; self.protocolNumber = protocolNumber
        self.sourcePort = sourcePort; self.destinationPort = destinationPort
    }

    /// `src=198.51.100.1 dst=203.0.113.53 sport=40000 dport=53`, as `conntrack -L` prints a tuple.
    public var description: String {
        var s = "src=\(source) dst=\(destination)"
        if let p = sourcePort { s += " sport=\(p)" }
        if let p = destinationPort { s += " dport=\(p)" }
        return s
    }
}

/// One conntrack entry: the original direction (as the client sent it) and the reply direction (as the
/// answer is expected back: after a DNAT its source is the endpoint, without one it is the original
/// destination itself).
public struct ConntrackEntry: Sendable, Hashable, CustomStringConvertible {
    public var original: ConntrackTuple
    public var reply: ConntrackTuple
    /// `CTA_ID`: a delete that carries it never removes a newer entry that reuses the same tuple.
    public var id: UInt32?
    /// `CTA_ZONE`, 0 for the default zone.
    public var zone: UInt16

    public init(original: ConntrackTuple, reply: ConntrackTuple, id: UInt32? = nil, zone: UInt16 = 0) {
        self.original = original; self.reply = reply; self.id = id; self.zone = zone
    }

    public var family: IPFamily { original.source.family }

    /// The original destination was translated: the reply comes from somewhere else.
    public var isTranslated: Bool { reply.source != original.destination || reply.sourcePort != original.destinationPort }

    public var description: String {
        let name = TransportProtocol.allCases.first { $0.number == original.protocolNumber }?.lowercased ?? "proto \(original.protocolNumber)"
        return "\(name) \(original) \(reply)" + (zone != 0 ? " zone=\(zone)" : "")
    }
}

/// Delete the conntrack entries whose original destination is `externalIP:port/protocol` and whose reply
/// source is `replySource` (and `replySourcePort`, when set): `conntrack -D -p udp --orig-dst <externalIP>
/// --orig-port-dst <port> --reply-src <replySource> --reply-port-src <replySourcePort>`.
public struct ConntrackDeletion: Sendable, Hashable, Comparable, CustomStringConvertible {
    public enum Reason: String, Sendable, Hashable, Comparable {
        /// The mapping is in both plans and this destination left its set: entries DNATed to it are stale.
        case endpointRemoved = "endpoint removed"
        /// The mapping is new: entries made before it, which nothing translated (they went towards the
        /// load balancer, or nowhere), would keep bypassing it.
        case mappingAdded = "mapping added"
        /// The mapping is gone: entries DNATed to its old destinations would keep using them.
        case mappingRemoved = "mapping removed"

        public static func < (a: Reason, b: Reason) -> Bool { a.rawValue < b.rawValue }
    }

    public let externalIP: IPAddress
    public let port: Int
    /// Always `.udp` from `ConntrackCleanup` (see there why).
    public let `protocol`: TransportProtocol
    /// The reply source to match; nil matches any.
    public let replySource: IPAddress?
    /// The reply source port to match; nil matches any.
    public let replySourcePort: Int?
    public let reason: Reason
    /// The service whose mapping changed (for logs).
    public let service: ObjectName

    public init(externalIP: IPAddress, port: Int, protocol: TransportProtocol, replySource: IPAddress?, replySourcePort: Int?,
                reason: Reason, service: ObjectName) {
        self.externalIP = externalIP; self.port = port; self.protocol = `protocol`
        self.replySource = replySource; self.replySourcePort = replySourcePort; self.reason = reason; self.service = service
    }

    public func matches(_ entry: ConntrackEntry) -> Bool {
        entry.original.protocolNumber == `protocol`.number
            && entry.original.destination == externalIP && entry.original.destinationPort == port
            && (replySource == nil || entry.reply.source == replySource)
            && (replySourcePort == nil || entry.reply.sourcePort == replySourcePort)
    }

    public static func < (a: ConntrackDeletion, b: ConntrackDeletion) -> Bool {
        func key(_ d: ConntrackDeletion) -> (IPAddress, TransportProtocol, Int, Reason) { (d.externalIP, d.protocol, d.port, d.reason) }
        if key(a) != key(b) { return key(a) < key(b) }
        switch (a.replySource, b.replySource) {
        case let (x?, y?) where x != y: return x < y
        case (nil, _?): return true
        case (_?, nil): return false
        default: return (a.replySourcePort ?? -1) < (b.replySourcePort ?? -1)
        }
    }

    /// `203.0.113.53:53/udp reply from 198.51.100.5:53 (kube-system/dns: endpoint removed)`.
    public var description: String {
        let from: String
        switch (replySource, replySourcePort) {
        case let (ip?, port?): from = "\(ip.bracketed):\(port)"
        case let (ip?, nil): from = ip.description
        case let (nil, port?): from = "any address, port \(port)"
        case (nil, nil): from = "anywhere"
        }
        return "\(externalIP.bracketed):\(port)/\(`protocol`.lowercased) reply from \(from) (\(service): \(reason.rawValue))"
    }
}

/// kube-proxy's UDP conntrack cleanup, for our mappings. A rule change never touches existing conntrack
/// entries, and a UDP client that keeps its socket (DNS resolvers do) keeps its entry as long as it keeps
/// sending: without a cleanup it talks to a removed endpoint, or keeps bypassing a new mapping, forever.
///
/// Only UDP, as kube-proxy does (pkg/proxy/conntrack: "we only deal with UDP protocol entries"): a TCP or
/// SCTP connection has state at both ends, so an entry's NAT binding is what keeps an established
/// connection alive; a client of a removed endpoint gets a reset or a timeout and reconnects by itself.
///
/// Mappings are keyed by external IP, protocol and port. For each UDP mapping:
/// - in both plans, with destinations lost: entries to `externalIP:port` whose reply source is a lost
///   destination (address AND port: an endpoint that moved to another port is lost too) — they were DNATed
///   there;
/// - only in `new`: entries to `externalIP:port` whose reply source is `externalIP:port` itself, i.e. that
///   nothing translated (made before the mapping existed; they went towards the load balancer or nowhere).
///   Entries another NAT (kube-proxy's, at a higher priority) translated are left alone;
/// - only in `old`: entries to `externalIP:port` whose reply source is one of its old destinations.
///
/// A mapping whose target is a kube-proxy jump, in either plan, yields nothing: its destinations are
/// kube-proxy's, unknown here, and kube-proxy cleans entries to a service's load-balancer and external IPs
/// itself. Entries to anything but our external IP:port are never selected.
///
/// Delete after the new plan is committed: a datagram sent between a delete and the commit would make its
/// entry again through the old rules.
public enum ConntrackCleanup {
    public static func deletions(from old: RulePlan, to new: RulePlan) -> [ConntrackDeletion] {
        var out: [ConntrackDeletion] = []
        func removed(_ was: Mapping) {
            guard !isJump(was.target) else { return }
            for d in was.target.destinations { out.append(deletion(was, replySource: d.ip, port: d.port, .mappingRemoved)) }
        }
        func added(_ now: Mapping) {
            guard !isJump(now.target) else { return }
            out.append(deletion(now, replySource: now.externalIP, port: now.port, .mappingAdded))
        }
        // The planners list rules sorted by address (family first), protocol and port, so the UDP rules are
        // sorted by address and port: one walk over both, reading the rules in place (at 10k Services,
        // building a table of each plan's mappings per sync cost more than the rest of a partial sync). A plan
        // in another order is compared through tables instead.
        guard udpRulesAreSorted(old), udpRulesAreSorted(new) else { return deletionsByTable(from: old, to: new) }
        old.rules.withUnsafeBufferPointer { or in
            new.rules.withUnsafeBufferPointer { nr in
                var i = 0, j = 0
                while true {
                    while i < or.count && or[i].mapping.protocol != .udp { i += 1 }
                    while j < nr.count && nr[j].mapping.protocol != .udp { j += 1 }
                    if i == or.count && j == nr.count { break }
                    if j == nr.count || (i < or.count && (or[i].mapping.externalIP, or[i].mapping.port) < (nr[j].mapping.externalIP, nr[j].mapping.port)) {
                        removed(or[i].mapping); i += 1; continue
                    }
                    if i == or.count || (nr[j].mapping.externalIP, nr[j].mapping.port) < (or[i].mapping.externalIP, or[i].mapping.port) {
                        added(nr[j].mapping); j += 1; continue
                    }
                    // The same external IP:port in both.
                    defer { i += 1; j += 1 }
                    guard or[i].mapping.target != nr[j].mapping.target, !isJump(or[i].mapping.target), !isJump(nr[j].mapping.target) else { continue }
                    let was = or[i].mapping
                    let kept = Set(nr[j].mapping.target.destinations)
                    for d in was.target.destinations where !kept.contains(d) {
                        out.append(deletion(was, replySource: d.ip, port: d.port, .endpointRemoved))
                    }
                }
            }
        }
        return out.sorted()
    }

    /// Whether `plan`'s UDP rules are strictly ascending by external IP and port.
    static func udpRulesAreSorted(_ plan: RulePlan) -> Bool {
        plan.rules.withUnsafeBufferPointer { rs in
            var last = -1
            for i in rs.indices where rs[i].mapping.protocol == .udp {
                if last >= 0 && !((rs[last].mapping.externalIP, rs[last].mapping.port) < (rs[i].mapping.externalIP, rs[i].mapping.port)) {
                    return false
                }
                last = i
            }
            return true
        }
    }

    /// `deletions` for plans whose rules are in any order: each plan's UDP mappings by external IP:port.
    static func deletionsByTable(from old: RulePlan, to new: RulePlan) -> [ConntrackDeletion] {
        struct Key: Hashable { var ip: IPAddress; var port: Int }
        func udpMappings(_ plan: RulePlan) -> [Key: Mapping] {
            var out: [Key: Mapping] = [:]
            for r in plan.rules where r.mapping.protocol == .udp { out[Key(ip: r.mapping.externalIP, port: r.mapping.port)] = r.mapping }
            return out
        }
        let before = udpMappings(old), after = udpMappings(new)
        var out: [ConntrackDeletion] = []
        for (key, was) in before where !isJump(was.target) {
            if let now = after[key] {
                guard !isJump(now.target) else { continue }
                let kept = Set(now.target.destinations)
                for d in was.target.destinations where !kept.contains(d) {
                    out.append(deletion(was, replySource: d.ip, port: d.port, .endpointRemoved))
                }
            } else {
                for d in was.target.destinations { out.append(deletion(was, replySource: d.ip, port: d.port, .mappingRemoved)) }
            }
        }
        for (key, now) in after where before[key] == nil && !isJump(now.target) {
            out.append(deletion(now, replySource: now.externalIP, port: now.port, .mappingAdded))
        }
        return out.sorted()
    }

    private static func deletion(_ m: Mapping, replySource: IPAddress, port: Int, _ reason: ConntrackDeletion.Reason) -> ConntrackDeletion {
        ConntrackDeletion(externalIP: m.externalIP, port: m.port, protocol: .udp, replySource: replySource, replySourcePort: port,
                          reason: reason, service: m.service)
    }
}

extension ConntrackCleanup {
    static func isJump(_ t: MappingTarget) -> Bool {
        if case .kubeProxyChain = t { return true }
        return false
    }
}

/// kube-proxy's reconciling form (it lists the table and deletes every UDP entry to a service IP whose reply
/// source is not a serving endpoint), for when the previous plan is unknown, e.g. an agent that just
/// started: an entry is stale when its original destination is one of `plan`'s UDP external IP:port and its
/// reply source (address and port) is not one of that mapping's destinations — DNATed to a destination the
/// plan no longer has, or not translated at all. Kube-proxy jumps are skipped, as in `ConntrackCleanup`.
/// Entries to an external IP:port the plan no longer maps at all are not found this way (only the
/// `deletions(from:to:)` of the plan that dropped it finds them).
public struct ConntrackStaleness: Sendable {
    private struct Key: Hashable {
        var ip: IPAddress
        var port: Int
    }
    private let destinations: [Key: Set<Destination>]
    let families: Set<IPFamily>

    public init(plan: RulePlan) {
        var destinations: [Key: Set<Destination>] = [:]
        for r in plan.rules where r.mapping.protocol == .udp && !ConntrackCleanup.isJump(r.mapping.target) {
            destinations[Key(ip: r.mapping.externalIP, port: r.mapping.port)] = Set(r.mapping.target.destinations)
        }
        self.destinations = destinations
        families = Set(destinations.keys.map(\.ip.family))
    }

    public var isEmpty: Bool { destinations.isEmpty }

    public func isStale(_ entry: ConntrackEntry) -> Bool {
        guard entry.original.protocolNumber == TransportProtocol.udp.number, let port = entry.original.destinationPort,
              let kept = destinations[Key(ip: entry.original.destination, port: port)],
              let replyPort = entry.reply.sourcePort else { return false }
        return !kept.contains(Destination(ip: entry.reply.source, port: replyPort))
    }
}

/// Matches entries against many deletions at once: an index by original destination, so that a dump of
/// hundreds of thousands of entries costs one hash lookup per entry, whatever the number of deletions.
struct ConntrackSelector: Sendable {
    private struct Key: Hashable {
        var ip: IPAddress
        var port: Int
        var protocolNumber: UInt8
    }
    private let index: [Key: [ConntrackDeletion]]
    let families: Set<IPFamily>
    let protocolNumbers: Set<UInt8>

    init(_ deletions: [ConntrackDeletion]) {
        var index: [Key: [ConntrackDeletion]] = [:]
        for d in deletions { index[Key(ip: d.externalIP, port: d.port, protocolNumber: d.protocol.number), default: []].append(d) }
        self.index = index
        families = Set(deletions.map(\.externalIP.family))
        protocolNumbers = Set(deletions.map(\.protocol.number))
    }

    var isEmpty: Bool { index.isEmpty }

    /// The first deletion that selects `entry`, or nil.
    func match(_ entry: ConntrackEntry) -> ConntrackDeletion? {
        guard let port = entry.original.destinationPort,
              let candidates = index[Key(ip: entry.original.destination, port: port, protocolNumber: entry.original.protocolNumber)]
        else { return nil }
        return candidates.first { $0.matches(entry) }
    }
}
