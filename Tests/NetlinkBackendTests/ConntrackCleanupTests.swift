import KubeObjects
import NetAddress
@testable import NetlinkBackend
@testable import RulePlanning
import ServiceResolution
import Testing

/// The pure half of the conntrack cleanup: which deletions a plan change makes, how entries match them,
/// and the ctnetlink messages (built with libmnl, decoded in Swift). No root needed.
@Suite("conntrack cleanup (pure)")
struct ConntrackCleanupTests {
    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    static func dns(_ endpoints4: [String], endpoints6: [String] = [], ips: [String] = ["203.0.113.53"], port: Int = 5300) -> ServiceSpec {
        ServiceSpec(namespace: "kube-system", name: "dns", ips: ips, ports: [("dns", .udp, 53, port), ("dns-tcp", .tcp, 53, port)],
                    endpoints4: endpoints4, endpoints6: endpoints6)
    }
    static let web = ServiceSpec(name: "web", ips: ["203.0.113.10"], ports: [("https", .tcp, 443, 8443)], endpoints4: ["198.51.100.9"])

    static func plan(_ specs: [ServiceSpec], strategy: TargetStrategy = .endpoints) throws -> RulePlan {
        try Fixtures.plan(specs, strategy: strategy)
    }

    /// (reply source, reason) pairs, for compact expectations.
    static func summary(_ d: [ConntrackDeletion]) -> [String] {
        d.map { "\($0.externalIP.bracketed):\($0.port)/\($0.protocol.lowercased) <- \($0.replySource.map(\.bracketed) ?? "*"):\($0.replySourcePort.map(String.init) ?? "*") \($0.reason.rawValue)" }
    }

    @Test("an endpoint that leaves a UDP mapping: delete entries DNATed to it (address and port), nothing for TCP")
    func endpointRemoved() throws {
        let old = try Self.plan([Self.dns(["198.51.100.5", "198.51.100.6"]), Self.web])
        let new = try Self.plan([Self.dns(["198.51.100.6", "198.51.100.7"]), Self.web])
        let d = ConntrackCleanup.deletions(from: old, to: new)
        #expect(Self.summary(d) == ["203.0.113.53:53/udp <- 198.51.100.5:5300 endpoint removed"])
        #expect(d[0].service == ObjectName(namespace: "kube-system", name: "dns"))
        #expect(d[0].description == "203.0.113.53:53/udp reply from 198.51.100.5:5300 (kube-system/dns: endpoint removed)")
        // Nothing changes, nothing is deleted; an added endpoint alone deletes nothing either.
        #expect(ConntrackCleanup.deletions(from: old, to: old).isEmpty)
        let grown = try Self.plan([Self.dns(["198.51.100.5", "198.51.100.6", "198.51.100.7"]), Self.web])
        #expect(ConntrackCleanup.deletions(from: old, to: grown).isEmpty)
    }

    @Test("an endpoint that moved to another port is a lost destination")
    func endpointPortChanged() throws {
        let old = try Self.plan([Self.dns(["198.51.100.5"], port: 5300)])
        let new = try Self.plan([Self.dns(["198.51.100.5"], port: 5353)])
        #expect(Self.summary(ConntrackCleanup.deletions(from: old, to: new)) == ["203.0.113.53:53/udp <- 198.51.100.5:5300 endpoint removed"])
    }

    @Test("a new UDP mapping: delete the untranslated entries to it (reply source = the external IP:port itself)")
    func mappingAdded() throws {
        let old = try Self.plan([Self.web])
        let new = try Self.plan([Self.dns(["198.51.100.5"], endpoints6: ["2001:db8:2::5"], ips: ["203.0.113.53", "2001:db8:e::53"]), Self.web])
        #expect(Self.summary(ConntrackCleanup.deletions(from: old, to: new)) == [
            "203.0.113.53:53/udp <- 203.0.113.53:53 mapping added",
            "[2001:db8:e::53]:53/udp <- [2001:db8:e::53]:53 mapping added",
        ])
    }

    @Test("a UDP mapping that disappears: delete entries DNATed to any of its old destinations")
    func mappingRemoved() throws {
        let old = try Self.plan([Self.dns(["198.51.100.5", "198.51.100.6"], ips: ["203.0.113.53", "203.0.113.54"]), Self.web])
        // One external IP goes; the other stays with the same endpoints.
        let new = try Self.plan([Self.dns(["198.51.100.5", "198.51.100.6"], ips: ["203.0.113.54"]), Self.web])
        #expect(Self.summary(ConntrackCleanup.deletions(from: old, to: new)) == [
            "203.0.113.53:53/udp <- 198.51.100.5:5300 mapping removed",
            "203.0.113.53:53/udp <- 198.51.100.6:5300 mapping removed",
        ])
        // The whole service goes (e.g. no ready endpoints any more), and comes back: removed, then added.
        let none = try Self.plan([Self.web])
        #expect(ConntrackCleanup.deletions(from: old, to: none).count == 4)
        #expect(ConntrackCleanup.deletions(from: none, to: old).map(\.reason) == [.mappingAdded, .mappingAdded])
    }

    @Test("cluster-ip targets: a changed VIP is a lost destination")
    func clusterIPTarget() throws {
        func plan(vip: String) throws -> RulePlan {
            var objects = Fixtures.objects([Self.dns([])])
            objects.services[0].clusterIPs = [Self.ip(vip)]
            let resolution = ServiceResolver(options: ResolutionOptions(target: .clusterIP)).resolve(objects)
            return try Planner(settings: PlanSettings()).plan(resolution, strategy: .clusterIP)
        }
        let d = ConntrackCleanup.deletions(from: try plan(vip: "198.18.0.10"), to: try plan(vip: "198.18.0.11"))
        #expect(Self.summary(d) == ["203.0.113.53:53/udp <- 198.18.0.10:53 endpoint removed"])
    }

    @Test("kube-proxy jumps, in either plan, yield no deletions (their destinations are kube-proxy's)")
    func kubeProxyTargets() throws {
        let endpoints = try Self.plan([Self.dns(["198.51.100.5"])])
        let jump = try Self.plan([Self.dns(["198.51.100.6"])], strategy: .kubeProxy)
        #expect(jump.rules.contains { if case .kubeProxyChain = $0.mapping.target { true } else { false } })
        #expect(ConntrackCleanup.deletions(from: endpoints, to: jump).isEmpty)
        #expect(ConntrackCleanup.deletions(from: jump, to: endpoints).isEmpty)
        #expect(ConntrackCleanup.deletions(from: try Self.plan([]), to: jump).isEmpty)
        #expect(ConntrackCleanup.deletions(from: jump, to: try Self.plan([])).isEmpty)
    }

    static func entry(_ proto: UInt8 = 17, src: String = "198.51.100.1", sport: Int = 40000, dst: String, dport: Int,
                      replySrc: String, replySport: Int, id: UInt32? = nil, zone: UInt16 = 0) -> ConntrackEntry {
        ConntrackEntry(original: ConntrackTuple(source: ip(src), destination: ip(dst), protocolNumber: proto, sourcePort: sport, destinationPort: dport),
                       reply: ConntrackTuple(source: ip(replySrc), destination: ip(src), protocolNumber: proto, sourcePort: replySport, destinationPort: sport),
                       id: id, zone: zone)
    }

    @Test("the walk over both sorted plans finds what comparing tables of their UDP mappings finds (200 random plan pairs), and plans out of order are compared through tables")
    func walkAgreesWithTables() throws {
        var rng = SplitMix(seed: 7)
        func randomPlan() throws -> RulePlan {
            var specs: [ServiceSpec] = []
            var used = Set<String>()
            for i in 0..<Int(rng.next() % 12) {
                // Few addresses and ports, so plans share, gain and lose external IP:ports.
                let ip = rng.next() % 3 == 0 ? "2001:db8:100::\(rng.next() % 6 + 1)" : "203.0.113.\(rng.next() % 6 + 1)"
                guard used.insert(ip).inserted else { continue }
                let port = Int(rng.next() % 3) + 53
                let pool4 = (0..<Int(rng.next() % 4)).map { _ in "198.51.100.\(rng.next() % 8 + 1)" }
                let pool6 = (0..<Int(rng.next() % 3)).map { _ in "2001:db8:200::\(rng.next() % 8 + 1)" }
                var ports: [(String, TransportProtocol, Int, Int)] = [("dns", .udp, port, 5300 + Int(rng.next() % 2)), ("tcp", .tcp, port, 5300)]
                // Sometimes a second UDP port on the same address, before or after the first.
                if rng.next() % 2 == 0 { ports.append(("alt", .udp, Int(rng.next() % 2) == 0 ? 50 : 60, 5400)) }
                specs.append(ServiceSpec(name: "s\(i)", ips: [ip], ports: ports,
                                         endpoints4: Array(Set(pool4)).sorted(), endpoints6: Array(Set(pool6)).sorted()))
            }
            return try Self.plan(specs)
        }
        var nonEmpty = 0
        for _ in 0..<200 {
            let old = try randomPlan(), new = try randomPlan()
            let walked = ConntrackCleanup.deletions(from: old, to: new)
            #expect(Self.summary(walked) == Self.summary(ConntrackCleanup.deletionsByTable(from: old, to: new)))
            #expect(walked.map(\.service) == ConntrackCleanup.deletionsByTable(from: old, to: new).map(\.service))
            if !walked.isEmpty { nonEmpty += 1 }
            // Rules in another order than the planners': compared through tables, with the same outcome.
            let reversed = Self.reversedRules(old)
            #expect(!ConntrackCleanup.udpRulesAreSorted(reversed) || reversed.rules.filter { $0.mapping.protocol == .udp }.count < 2)
            #expect(Self.summary(ConntrackCleanup.deletions(from: reversed, to: new)) == Self.summary(walked))
            #expect(Self.summary(ConntrackCleanup.deletions(from: old, to: Self.reversedRules(new))) == Self.summary(walked))
        }
        #expect(nonEmpty > 100)
    }

    /// `plan` with its rules in reverse order.
    static func reversedRules(_ plan: RulePlan) -> RulePlan {
        RulePlan(settings: plan.settings, strategy: plan.strategy, rules: plan.rules.reversed(), targetChains: plan.targetChains,
                 skipped: plan.skipped, conflicts: plan.conflicts, warnings: plan.warnings)
    }

    /// A small deterministic generator (SplitMix64), so a failure can be replayed.
    struct SplitMix {
        var state: UInt64
        init(seed: UInt64) { state = seed }
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

    @Test("matching: original destination, protocol, reply source and port must all agree")
    func matching() throws {
        let old = try Self.plan([Self.dns(["198.51.100.5"])])
        let new = try Self.plan([Self.dns(["198.51.100.6"])])
        let removed = try #require(ConntrackCleanup.deletions(from: old, to: new).first)
        let added = try #require(ConntrackCleanup.deletions(from: try Self.plan([]), to: new).first)

        let toE1 = Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300)
        let untranslated = Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "203.0.113.53", replySport: 53)
        #expect(toE1.isTranslated && !untranslated.isTranslated)
        #expect(removed.matches(toE1) && !removed.matches(untranslated))
        #expect(added.matches(untranslated) && !added.matches(toE1))
        // Same endpoint, but another external port, another external IP, another endpoint port, TCP: untouched.
        #expect(!removed.matches(Self.entry(dst: "203.0.113.53", dport: 54, replySrc: "198.51.100.5", replySport: 5300)))
        #expect(!removed.matches(Self.entry(dst: "203.0.113.54", dport: 53, replySrc: "198.51.100.5", replySport: 5300)))
        #expect(!removed.matches(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5301)))
        #expect(!removed.matches(Self.entry(6, dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300)))

        let selector = ConntrackSelector([removed, added])
        #expect(selector.families == [.ipv4] && selector.protocolNumbers == [17])
        #expect(selector.match(toE1) == removed)
        #expect(selector.match(untranslated) == added)
        #expect(selector.match(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.7", replySport: 5300)) == nil)
        #expect(ConntrackSelector([]).isEmpty)
    }

    @Test("staleness (the previous plan unknown): UDP entries to a mapping whose reply source is not one of its destinations")
    func staleness() throws {
        let plan = try Self.plan([Self.dns(["198.51.100.6"]), Self.web])
        let s = ConntrackStaleness(plan: plan)
        #expect(s.families == [.ipv4] && !s.isEmpty)
        #expect(s.isStale(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300)))   // gone endpoint
        #expect(s.isStale(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.6", replySport: 5301)))   // moved port
        #expect(s.isStale(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "203.0.113.53", replySport: 53)))     // untranslated
        #expect(!s.isStale(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.6", replySport: 5300)))  // current
        #expect(!s.isStale(Self.entry(6, dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300))) // TCP
        #expect(!s.isStale(Self.entry(dst: "203.0.113.54", dport: 53, replySrc: "198.51.100.5", replySport: 5300)))  // not ours
        #expect(!s.isStale(Self.entry(dst: "203.0.113.10", dport: 443, replySrc: "203.0.113.10", replySport: 443)))
        #expect(ConntrackStaleness(plan: try Self.plan([Self.dns(["198.51.100.6"])], strategy: .kubeProxy)).isEmpty)
    }

    @Test("ctnetlink messages: an entry built with libmnl decodes to itself (IPv4 and IPv6, id and zone)")
    func wireRoundTrip() throws {
        let entries = [
            Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300, id: 0xdead_beef),
            Self.entry(src: "2001:db8:2::1", sport: 1, dst: "2001:db8:e::53", dport: 65535, replySrc: "2001:db8:2::5", replySport: 5300, zone: 7),
            Self.entry(6, dst: "203.0.113.10", dport: 443, replySrc: "203.0.113.10", replySport: 443),
        ]
        var enc = ConntrackEncoder()
        var bytes: [UInt8] = []
        for (i, e) in entries.enumerated() { enc.entryMessage(e, type: Ctnl.msgNew, seq: 100 + UInt32(i), includeReply: true, into: &bytes) }
        let headers = NetlinkParse.messages(in: bytes)
        #expect(headers.map(\.sequence) == [100, 101, 102])
        #expect(headers.compactMap { ConntrackWire.entry(bytes, $0) } == entries)
        #expect(bytes[headers[1].offset + 16] == 10)  // nfgenmsg family AF_INET6
    }

    @Test("a delete always carries the original tuple (without one the kernel flushes the table) and the id")
    func deleteMessage() throws {
        var enc = ConntrackEncoder()
        var bytes: [UInt8] = []
        enc.entryMessage(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300, id: 42), seq: 9, into: &bytes)
        let h = try #require(NetlinkParse.messages(in: bytes).first)
        #expect(h.type == Ctnl.msgDelete)
        #expect(h.flags & 0x5 == 0x5)  // NLM_F_REQUEST | NLM_F_ACK
        var types: [UInt16] = []
        var original: ConntrackTuple?
        ConntrackWire.forEachAttribute(bytes, (h.offset + 20)..<(h.offset + h.length)) { t, v in
            types.append(t)
            if t == Ctnl.tupleOrig { original = ConntrackWire.tuple(bytes, v) }
            if t == Ctnl.id { #expect(ConntrackWire.be32(bytes, v.lowerBound) == 42) }
        }
        #expect(types == [Ctnl.tupleOrig, Ctnl.id])
        #expect(original?.description == "src=198.51.100.1 dst=203.0.113.53 sport=40000 dport=53")
    }

    @Test("the dump request: one family, NLM_F_DUMP, and a protocol filter when asked")
    func dumpRequest() throws {
        var enc = ConntrackEncoder()
        var plain: [UInt8] = [], filtered: [UInt8] = []
        enc.dumpRequest(family: .ipv6, protocolNumber: nil, seq: 1, into: &plain)
        enc.dumpRequest(family: .ipv4, protocolNumber: 17, seq: 2, into: &filtered)
        let p = try #require(NetlinkParse.messages(in: plain).first)
        #expect(p.type == Ctnl.msgGet && p.flags & 0x300 == 0x300 && p.length == 20 && plain[16] == 10)
        let f = try #require(NetlinkParse.messages(in: filtered).first)
        #expect(filtered[16] == 2)
        var flags: UInt32?, proto: UInt8?
        ConntrackWire.forEachAttribute(filtered, 20..<f.length) { t, v in
            if t == Ctnl.filter {
                ConntrackWire.forEachAttribute(filtered, v) { t2, v2 in if t2 == Ctnl.filterOrigFlags { flags = NetlinkWire.u32(filtered, v2.lowerBound) } }
            }
            if t == Ctnl.tupleOrig {
                ConntrackWire.forEachAttribute(filtered, v) { t2, v2 in
                    if t2 == Ctnl.tupleProto { ConntrackWire.forEachAttribute(filtered, v2) { t3, v3 in if t3 == Ctnl.protoNum { proto = filtered[v3.lowerBound] } } }
                }
            }
        }
        #expect(flags == 8 && proto == 17)
    }

    @Test("decoding stops at malformed attributes instead of reading past them")
    func malformed() {
        var enc = ConntrackEncoder()
        var bytes: [UInt8] = []
        enc.entryMessage(Self.entry(dst: "203.0.113.53", dport: 53, replySrc: "198.51.100.5", replySport: 5300), type: Ctnl.msgNew, seq: 1,
                         includeReply: true, into: &bytes)
        let h = NetlinkParse.messages(in: bytes)[0]
        for cut in stride(from: 20, to: h.length, by: 3) {
            var truncated = Array(bytes[0..<cut])
            NetlinkWire.putU32(UInt32(cut), into: &truncated, at: 0)
            for h2 in NetlinkParse.messages(in: truncated) { _ = ConntrackWire.entry(truncated, h2) }  // must not trap
        }
        var corrupt = bytes
        corrupt[20] = 0xff; corrupt[21] = 0xff  // first attribute claims 65535 bytes
        #expect(ConntrackWire.entry(corrupt, h) == nil)
    }

    @Test("errors: EPERM is a permission error, a kernel without ctnetlink is 'unavailable'")
    func errors() {
        #expect(ConntrackTable.error(errno: 1, operation: "x").kind == .permissionDenied)
        let missing = ConntrackTable.error(errno: 22, operation: "reading the IPv4 conntrack table")
        #expect(missing.kind == .unavailable)
        #expect(missing.description.contains("nf_conntrack_netlink"))
        #expect(ConntrackTable.error(errno: 16, operation: "x").kind == .rejected)
    }
}
