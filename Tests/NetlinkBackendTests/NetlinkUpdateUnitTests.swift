import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import ServiceResolution
import Testing

/// Incremental updates without a kernel: which operations `RulesetProgram.changes(from:to:)` makes, in
/// which order, and that they turn the old table into the new one (on a model of the kernel's checks).
@Suite("incremental nftables updates without a kernel")
struct NetlinkUpdateUnitTests {
    /// web (3 IPv4 and 2 IPv6 endpoints), dns (UDP, 1 endpoint), api (3 endpoints: keeps pick4-tcp-3 alive
    /// when web loses one).
    static func specs(web4: [String] = ["198.51.100.5", "198.51.100.6", "198.51.100.7"],
                      web6: [String] = ["2001:db8::5", "2001:db8::6"], extra: [ServiceSpec] = []) -> [ServiceSpec] {
        [
            ServiceSpec(name: "web", ips: ["203.0.113.10", "2001:db8::10"], ports: [("https", .tcp, 443, 8443)],
                        endpoints4: web4, endpoints6: web6),
            ServiceSpec(name: "dns", ips: ["203.0.113.11"], ports: [("dns", .udp, 53, 53)], endpoints4: ["198.51.100.53"]),
            ServiceSpec(namespace: "prod", name: "api", ips: ["203.0.113.12"], ports: [("", .tcp, 8000, 9000)],
                        endpoints4: ["198.51.100.8", "198.51.100.9", "198.51.100.10"]),
        ] + extra
    }

    static func plan(_ specs: [ServiceSpec], settings: PlanSettings = PlanSettings()) throws -> RulePlan {
        try Fixtures.plan(specs, settings: settings)
    }

    /// `kind: description` per operation, with `!` for NLM_F_EXCL.
    static func summary(_ ops: [NftOperation]) -> [String] {
        ops.map { op in
            let kind: String
            switch op.kind {
            case .newTable: kind = "newTable"
            case .deleteTable: kind = "deleteTable"
            case .newChain: kind = "newChain"
            case .deleteChain: kind = "deleteChain"
            case .newSet: kind = "newSet"
            case .newElements(_, let e): kind = "newElements(\(e.count))"
            case .deleteElements(_, let e): kind = "deleteElements(\(e.count))"
            case .newRule: kind = "newRule"
            case .deleteSet: kind = "deleteSet"
            case .flushChain: kind = "flushChain"
            }
            return "\(kind)\(op.exclusive ? "!" : ""): \(op.description)"
        }
    }

    /// `changes(old → new)`, checked on the kernel model: the result decodes to exactly `expected(new)`.
    static func changes(_ old: RulePlan, _ new: RulePlan, sourceLocation: SourceLocation = #_sourceLocation) throws -> [NftOperation] {
        let ops = try #require(try RulesetProgram.changes(from: old, to: new), sourceLocation: sourceLocation)
        var model = try KernelModel(NetlinkUnitTests.simulatedDump(old))
        try model.commit(ops)
        #expect(RulesetDecoder.decode(model.dump) == NftablesNetlink.expected(new), sourceLocation: sourceLocation)
        return ops
    }

    /// dns has source ranges (203.0.113.0/25), api ClientIP affinity (60 s); web is plain.
    static func mixed(_ specs: [ServiceSpec], ranged: Set<String> = ["dns"], ranges: [String] = ["203.0.113.0/25"],
                      sticky: Set<String> = ["api"], timeout: Int = 60) throws -> RulePlan {
        try Fixtures.mixedPolicyPlan(specs, ranged: ranged, ranges: ranges, sticky: sticky, timeout: timeout)
    }

    /// `specs()` with api's IPv4 endpoints replaced.
    static func specs(api: [String], extra: [ServiceSpec] = []) -> [ServiceSpec] {
        Self.specs(extra: extra).map { s in
            var s = s
            if s.name == "api" { s.endpoints4 = api }
            return s
        }
    }

    /// The descriptions `changes` gives api's affinity chain and sets in `plan`.
    struct Sticky {
        let chain: TargetChain
        init(_ plan: RulePlan, _ service: String = "api") throws {
            chain = try #require(plan.affinityChains.first { $0.service.name == service })
        }
        var name: String { chain.iptablesName }
        func set(_ ip: String, port: Int = 9000) -> String { chain.affinityName(Destination(ip: IPAddress(ip)!, port: port)) }
        func newSet(_ ip: String, port: Int = 9000) -> String {
            "newSet!: adding set \(set(ip, port: port)) (type ipv4_addr; flags dynamic,timeout; timeout \(chain.affinityTimeout!)s, "
                + "ClientIP affinity to \(ip):\(port))"
        }
        func deleteSet(_ ip: String, port: Int = 9000) -> String {
            "deleteSet: deleting set \(set(ip, port: port)) (ClientIP affinity to \(ip):\(port), with its clients)"
        }
        var flush: String { "flushChain: deleting the rules of chain \(name) (ClientIP affinity for \(chain.comment))" }
        /// The rules as the full apply writes them.
        var rules: [String] { chain.nftAffinityRules.map { "newRule: adding rule to chain \(name): \($0)" } }
    }

    @Test("no change next to ranged and sticky services sends nothing; dropping the last source range or changing an affinity timeout replaces")
    func policyNoChangeAndReplaces() throws {
        let plain = try Self.plan(Self.specs())
        let mixed = try Self.mixed(Self.specs())
        #expect(mixed.hasSourceRanges && !mixed.affinityChains.isEmpty)
        #expect(try RulesetProgram.changes(from: mixed, to: try Self.mixed(Self.specs()))?.isEmpty == true)
        // The ranged rules would have to be deleted by handle: a full replace.
        #expect(try RulesetProgram.changes(from: mixed, to: try Self.mixed(Self.specs(), ranged: [])) == nil)
        #expect(try RulesetProgram.changes(from: mixed, to: plain) == nil)
        // A set's timeout is fixed when it is created.
        #expect(try RulesetProgram.changes(from: mixed, to: try Self.mixed(Self.specs(), timeout: 61)) == nil)
        // Everything else is incremental, also from and to no policy at all (checked on the kernel model).
        _ = try Self.changes(plain, mixed)
        _ = try Self.changes(mixed, try Self.mixed(Self.specs(), sticky: []))
        _ = try Self.changes(try Self.mixed(Self.specs(), sticky: []), mixed)
    }

    @Test("a change to a plain service next to ranged and sticky ones touches only its elements")
    func plainChangeBesidePolicyServices() throws {
        let old = try Self.mixed(Self.specs())
        let new = try Self.mixed(Self.specs(web4: ["198.51.100.5", "198.51.100.7"]))
        let ops = try Self.changes(old, new)
        #expect(!ops.isEmpty)
        #expect(ops.allSatisfy { !$0.description.contains("ranged") && !$0.description.contains("affinity") }, "\(Self.summary(ops))")
    }

    @Test("sticky service: an endpoint added gets its set, the chain's rules are written anew, the other sets stay")
    func affinityEndpointAdded() throws {
        let old = try Self.mixed(Self.specs())
        let new = try Self.mixed(Self.specs(api: ["198.51.100.8", "198.51.100.9", "198.51.100.10", "198.51.100.11"]))
        let api = try Sticky(new)
        #expect(Self.summary(try Self.changes(old, new)) == [api.newSet("198.51.100.11"), api.flush] + api.rules)
        #expect(api.rules.count == 8)
        let c = RulesetProgram.counts(try Self.changes(old, new))
        #expect([c.elementsAdded, c.elementsDeleted, c.chainsAdded, c.chainsDeleted, c.setsAdded, c.setsDeleted, c.chainsRewritten]
                == [0, 0, 0, 0, 1, 0, 1] as [Int])
    }

    @Test("sticky service: an endpoint removed: the rules first, then its set; the other sets stay")
    func affinityEndpointRemoved() throws {
        let old = try Self.mixed(Self.specs())
        let new = try Self.mixed(Self.specs(api: ["198.51.100.8", "198.51.100.10"]))
        let api = try Sticky(new)
        #expect(Self.summary(try Self.changes(old, new)) == [api.flush] + api.rules + [api.deleteSet("198.51.100.9")])
        #expect(api.rules.count == 4)
        // Deleting the set before its rules are gone is refused (EBUSY), on the model as in the kernel.
        var reordered = try #require(try RulesetProgram.changes(from: old, to: new))
        reordered.insert(reordered.removeLast(), at: 0)
        var model = try KernelModel(NetlinkUnitTests.simulatedDump(old))
        #expect(throws: KernelModel.Refused.self) { try model.commit(reordered) }
    }

    @Test("sticky service: an endpoint replaced: the new set before the rules, the old set after them")
    func affinityEndpointReplaced() throws {
        let old = try Self.mixed(Self.specs())
        let new = try Self.mixed(Self.specs(api: ["198.51.100.8", "198.51.100.9", "198.51.100.20"]))
        let api = try Sticky(new)
        #expect(Self.summary(try Self.changes(old, new)) == [api.newSet("198.51.100.20"), api.flush] + api.rules + [api.deleteSet("198.51.100.10")])
        // A port change is a new destination too (the set is named by address and port).
        let port = try Self.mixed(Self.specs().map { s in
            var s = s
            if s.name == "api" { s.ports = [("", .tcp, 8000, 9001)] }
            return s
        })
        let p = try Sticky(port)
        #expect(Self.summary(try Self.changes(old, port))
                == ["198.51.100.8", "198.51.100.9", "198.51.100.10"].map { p.newSet($0, port: 9001) } + [p.flush] + p.rules
                    + ["198.51.100.8", "198.51.100.9", "198.51.100.10"].map { p.deleteSet($0) })
    }

    @Test("a sticky service added and deleted beside others: sets, chain, rules, dispatch element; and the way back")
    func stickyServiceAddedAndDeleted() throws {
        let cart = ServiceSpec(namespace: "shop", name: "cart", ips: ["192.0.2.30"], ports: [("http", .tcp, 80, 8080)],
                               endpoints4: ["198.51.100.31", "198.51.100.32"])
        let old = try Self.mixed(Self.specs())
        let new = try Self.mixed(Self.specs(extra: [cart]), sticky: ["api", "cart"])
        let c = try Sticky(new, "cart")
        #expect(Self.summary(try Self.changes(old, new)) == [
            c.newSet("198.51.100.31", port: 8080), c.newSet("198.51.100.32", port: 8080),
            "newChain!: adding chain \(c.name) (ClientIP affinity for shop/cart:http)",
        ] + c.rules + [
            "newElements(1)!: adding element 192.0.2.30 . tcp . 80 comment \"shop/cart:http\" : goto \(c.name) to map dispatch4",
            "newElements(1)!: adding element 192.0.2.30 to set masquerade4",
        ])
        #expect(Self.summary(try Self.changes(new, old)) == [
            "deleteElements(1): deleting element 192.0.2.30 . tcp . 80 comment \"shop/cart:http\" : goto \(c.name) from map dispatch4",
            "deleteElements(1): deleting element 192.0.2.30 from set masquerade4",
            "deleteChain: deleting chain \(c.name) (ClientIP affinity for shop/cart:http, with its rules)",
            c.deleteSet("198.51.100.31", port: 8080), c.deleteSet("198.51.100.32", port: 8080),
        ])
    }

    @Test("a service gains and loses affinity: its chain and sets come and go, its dispatch entry and slots move")
    func affinityGainedAndLost() throws {
        let plain = try Self.mixed(Self.specs(), sticky: [])
        let sticky = try Self.mixed(Self.specs())
        let api = try Sticky(sticky)
        #expect(Self.summary(try Self.changes(plain, sticky)) == [
            api.newSet("198.51.100.8"), api.newSet("198.51.100.9"), api.newSet("198.51.100.10"),
            "newChain!: adding chain \(api.name) (ClientIP affinity for prod/api:8000)",
        ] + api.rules + [
            "deleteElements(1): deleting element 203.0.113.12 . tcp . 8000 comment \"prod/api:8000\" : goto pick4-tcp-3 from map dispatch4",
            "deleteElements(3): deleting 3 elements (203.0.113.12 . tcp . 8000 . 0 : 198.51.100.8 . 9000 … 203.0.113.12 . tcp . 8000 . 2 : 198.51.100.10 . 9000) from map endpoints4",
            "newElements(1)!: adding element 203.0.113.12 . tcp . 8000 comment \"prod/api:8000\" : goto \(api.name) to map dispatch4",
        ])  // pick4-tcp-3 stays: web uses it
        #expect(Self.summary(try Self.changes(sticky, plain)) == [
            "deleteElements(1): deleting element 203.0.113.12 . tcp . 8000 comment \"prod/api:8000\" : goto \(api.name) from map dispatch4",
            "newElements(1)!: adding element 203.0.113.12 . tcp . 8000 comment \"prod/api:8000\" : goto pick4-tcp-3 to map dispatch4",
            "newElements(3)!: adding 3 elements (203.0.113.12 . tcp . 8000 . 0 : 198.51.100.8 . 9000 … 203.0.113.12 . tcp . 8000 . 2 : 198.51.100.10 . 9000) to map endpoints4",
            "deleteChain: deleting chain \(api.name) (ClientIP affinity for prod/api:8000, with its rules)",
            api.deleteSet("198.51.100.8"), api.deleteSet("198.51.100.9"), api.deleteSet("198.51.100.10"),
        ])
    }

    @Test("source ranges: a block added, removed or changed is exactly that ranged element; the first ranged mapping creates the maps")
    func sourceRanges() throws {
        let old = try Self.mixed(Self.specs())
        let two = try Self.mixed(Self.specs(), ranges: ["203.0.113.0/25", "192.0.2.0/24"])
        let element = { (block: String) in "203.0.113.11 . udp . 53 . \(block) comment \"default/dns:dns\" : goto pick4-udp-1" }
        #expect(Self.summary(try Self.changes(old, two)) == ["newElements(1)!: adding element \(element("192.0.2.0/24")) to map ranged4"])
        #expect(Self.summary(try Self.changes(two, old)) == ["deleteElements(1): deleting element \(element("192.0.2.0/24")) from map ranged4"])
        // A delete names the whole interval (key and key end), as nft does.
        let delete = try #require(try RulesetProgram.changes(from: two, to: old)?.first)
        guard case .deleteElements(_, let es) = delete.kind else { Issue.record("\(delete.description)"); return }
        #expect(es.count == 1 && es[0].keyEnd != nil && es[0].verdict == nil)
        let narrower = try Self.mixed(Self.specs(), ranges: ["203.0.113.0/26"])
        #expect(Self.summary(try Self.changes(old, narrower)) == [
            "deleteElements(1): deleting element \(element("203.0.113.0/25")) from map ranged4",
            "newElements(1)!: adding element \(element("203.0.113.0/26")) to map ranged4",
        ])
        // A ranged mapping's verdict follows its target: an endpoint added to dns moves all its blocks.
        var more = Self.specs()
        more[1].endpoints4 = ["198.51.100.53", "198.51.100.54"]
        let moved = Self.summary(try Self.changes(two, try Self.mixed(more, ranges: ["203.0.113.0/25", "192.0.2.0/24"])))
        #expect(moved.contains("deleteElements(2): deleting 2 elements (\(element("192.0.2.0/24")) … \(element("203.0.113.0/25"))) from map ranged4"), "\(moved)")
        #expect(!moved.contains { $0.contains("dispatch4") }, "\(moved)")
        // A ranged service added beside another: its blocks, slots and masquerade address.
        let admin = ServiceSpec(name: "admin", ips: ["192.0.2.40"], ports: [("ssh", .tcp, 22, 22)], endpoints4: ["198.51.100.40"])
        let added = try Self.mixed(Self.specs(extra: [admin]), ranged: ["dns", "admin"])
        #expect(Self.summary(try Self.changes(old, added)) == [
            "newChain!: adding chain pick4-tcp-1",
            "newRule: adding rule to chain pick4-tcp-1: meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @endpoints4",
            "newElements(1)!: adding element 192.0.2.40 . tcp . 22 . 203.0.113.0/25 comment \"default/admin:ssh\" : goto pick4-tcp-1 to map ranged4",
            "newElements(1)!: adding element 192.0.2.40 . tcp . 22 . 0 : 198.51.100.40 . 22 to map endpoints4",
            "newElements(1)!: adding element 192.0.2.40 to set masquerade4",
        ])
        #expect(Self.summary(try Self.changes(added, old)).contains(
            "deleteElements(1): deleting element 192.0.2.40 . tcp . 22 . 203.0.113.0/25 comment \"default/admin:ssh\" : goto pick4-tcp-1 from map ranged4"))
        // The first source range: both ranged maps and their rules, then dns moves from dispatch4 to ranged4.
        let plain = try Self.mixed(Self.specs(), ranged: [])
        #expect(Self.summary(try Self.changes(plain, old)) == [
            "newSet!: adding map ranged4 (type ipv4_addr . inet_proto . inet_service . ipv4_addr : verdict; flags interval)",
            "newSet!: adding map ranged6 (type ipv6_addr . inet_proto . inet_service . ipv6_addr : verdict; flags interval)",
            "newRule: adding rule to chain output: ip daddr . meta l4proto . th dport . ip saddr vmap @ranged4",
            "newRule: adding rule to chain output: ip6 daddr . meta l4proto . th dport . ip6 saddr vmap @ranged6",
            "deleteElements(1): deleting element 203.0.113.11 . udp . 53 comment \"default/dns:dns\" : goto pick4-udp-1 from map dispatch4",
            "newElements(1)!: adding element \(element("203.0.113.0/25")) to map ranged4",
        ])
    }

    @Test("one endpoint removed: the slots after it shift down, the dispatch entry moves to the pick chain for N-1")
    func endpointRemoved() throws {
        let old = try Self.plan(Self.specs())
        let new = try Self.plan(Self.specs(web4: ["198.51.100.5", "198.51.100.7"]))
        #expect(Self.summary(try Self.changes(old, new)) == [
            "newChain!: adding chain pick4-tcp-2",
            "newRule: adding rule to chain pick4-tcp-2: meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints4",
            "deleteElements(1): deleting element 203.0.113.10 . tcp . 443 comment \"default/web:https\" : goto pick4-tcp-3 from map dispatch4",
            "deleteElements(2): deleting 2 elements (203.0.113.10 . tcp . 443 . 1 : 198.51.100.6 . 8443 … 203.0.113.10 . tcp . 443 . 2 : 198.51.100.7 . 8443) from map endpoints4",
            "newElements(1)!: adding element 203.0.113.10 . tcp . 443 comment \"default/web:https\" : goto pick4-tcp-2 to map dispatch4",
            "newElements(1)!: adding element 203.0.113.10 . tcp . 443 . 1 : 198.51.100.7 . 8443 to map endpoints4",
        ])  // pick4-tcp-3 stays: api still uses it
        let c = RulesetProgram.counts(try Self.changes(old, new))
        #expect(c.elementsAdded == 2 && c.elementsDeleted == 3 && c.chainsAdded == 1 && c.chainsDeleted == 0)
    }

    @Test("one endpoint added; an IPv6 endpoint added makes a new pick chain and drops the one nothing uses")
    func endpointAdded() throws {
        let old = try Self.plan(Self.specs())
        let new4 = try Self.plan(Self.specs(web4: ["198.51.100.5", "198.51.100.6", "198.51.100.7", "198.51.100.99"]))
        #expect(Self.summary(try Self.changes(old, new4)) == [
            "newChain!: adding chain pick4-tcp-4",
            "newRule: adding rule to chain pick4-tcp-4: meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 4 map @endpoints4",
            "deleteElements(1): deleting element 203.0.113.10 . tcp . 443 comment \"default/web:https\" : goto pick4-tcp-3 from map dispatch4",
            "newElements(1)!: adding element 203.0.113.10 . tcp . 443 comment \"default/web:https\" : goto pick4-tcp-4 to map dispatch4",
            "newElements(1)!: adding element 203.0.113.10 . tcp . 443 . 3 : 198.51.100.99 . 8443 to map endpoints4",
        ])
        let new6 = try Self.plan(Self.specs(web6: ["2001:db8::5", "2001:db8::6", "2001:db8::7"]))
        #expect(Self.summary(try Self.changes(old, new6)) == [
            "newChain!: adding chain pick6-tcp-3",
            "newRule: adding rule to chain pick6-tcp-3: meta l4proto tcp dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints6",
            "deleteElements(1): deleting element 2001:db8::10 . tcp . 443 comment \"default/web:https\" : goto pick6-tcp-2 from map dispatch6",
            "newElements(1)!: adding element 2001:db8::10 . tcp . 443 comment \"default/web:https\" : goto pick6-tcp-3 to map dispatch6",
            "newElements(1)!: adding element 2001:db8::10 . tcp . 443 . 2 : 2001:db8::7 . 8443 to map endpoints6",
            "deleteChain: deleting chain pick6-tcp-2 (with its rule)",
        ])
        // The way back deletes what was added and restores the chain.
        #expect(Self.summary(try Self.changes(new6, old)).first == "newChain!: adding chain pick6-tcp-2")
        #expect(Self.summary(try Self.changes(new6, old)).last == "deleteChain: deleting chain pick6-tcp-3 (with its rule)")
    }

    @Test("an endpoint replaced by another in the same slot: that slot only")
    func endpointReplaced() throws {
        let old = try Self.plan(Self.specs())
        let new = try Self.plan(Self.specs(web4: ["198.51.100.5", "198.51.100.6", "198.51.100.70"]))
        #expect(Self.summary(try Self.changes(old, new)) == [
            "deleteElements(1): deleting element 203.0.113.10 . tcp . 443 . 2 : 198.51.100.7 . 8443 from map endpoints4",
            "newElements(1)!: adding element 203.0.113.10 . tcp . 443 . 2 : 198.51.100.70 . 8443 to map endpoints4",
        ])
    }

    @Test("a mapping (service) added and removed: dispatch entry, slots, masquerade address, pick chain")
    func mappingAddedAndRemoved() throws {
        let old = try Self.plan(Self.specs())
        let extra = ServiceSpec(name: "mail", ips: ["192.0.2.25"], ports: [("smtp", .tcp, 25, 2525)],
                                endpoints4: ["198.51.100.25", "198.51.100.26", "198.51.100.27", "198.51.100.28", "198.51.100.29"])
        let new = try Self.plan(Self.specs(extra: [extra]))
        #expect(Self.summary(try Self.changes(old, new)) == [
            "newChain!: adding chain pick4-tcp-5",
            "newRule: adding rule to chain pick4-tcp-5: meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 5 map @endpoints4",
            "newElements(1)!: adding element 192.0.2.25 . tcp . 25 comment \"default/mail:smtp\" : goto pick4-tcp-5 to map dispatch4",
            "newElements(5)!: adding 5 elements (192.0.2.25 . tcp . 25 . 0 : 198.51.100.25 . 2525 … 192.0.2.25 . tcp . 25 . 4 : 198.51.100.29 . 2525) to map endpoints4",
            "newElements(1)!: adding element 192.0.2.25 to set masquerade4",
        ])
        #expect(Self.summary(try Self.changes(new, old)) == [
            "deleteElements(1): deleting element 192.0.2.25 . tcp . 25 comment \"default/mail:smtp\" : goto pick4-tcp-5 from map dispatch4",
            "deleteElements(5): deleting 5 elements (192.0.2.25 . tcp . 25 . 0 : 198.51.100.25 . 2525 … 192.0.2.25 . tcp . 25 . 4 : 198.51.100.29 . 2525) from map endpoints4",
            "deleteElements(1): deleting element 192.0.2.25 from set masquerade4",
            "deleteChain: deleting chain pick4-tcp-5 (with its rule)",
        ])
        // A second port on an address that is already masqueraded adds no masquerade element.
        let port = ServiceSpec(name: "web2", ips: ["203.0.113.10"], ports: [("alt", .tcp, 8443, 8443)], endpoints4: ["198.51.100.5"])
        let ops = try Self.changes(old, try Self.plan(Self.specs(extra: [port])))
        #expect(!Self.summary(ops).contains { $0.contains("masquerade") })
        let c = RulesetProgram.counts(ops)
        #expect([c.elementsAdded, c.elementsDeleted, c.chainsAdded, c.chainsDeleted] == [2, 0, 1, 0] as [Int])
        // Without masquerading there are no masquerade sets to change.
        let noMasq = PlanSettings(masquerade: false)
        let ops2 = try Self.changes(try Self.plan(Self.specs(), settings: noMasq), try Self.plan(Self.specs(extra: [extra]), settings: noMasq))
        #expect(!Self.summary(ops2).contains { $0.contains("masquerade") } && ops2.count == 4)
    }

    @Test("an IPv6 external address removed: its masquerade6 element goes too")
    func masqueradeAddressRemoved() throws {
        let old = try Self.plan(Self.specs())
        var specs = Self.specs()
        specs[0].ips = ["203.0.113.10"]
        let ops = try Self.changes(old, try Self.plan(specs))
        #expect(Self.summary(ops) == [
            "deleteElements(1): deleting element 2001:db8::10 . tcp . 443 comment \"default/web:https\" : goto pick6-tcp-2 from map dispatch6",
            "deleteElements(2): deleting 2 elements (2001:db8::10 . tcp . 443 . 0 : 2001:db8::5 . 8443 … 2001:db8::10 . tcp . 443 . 1 : 2001:db8::6 . 8443) from map endpoints6",
            "deleteElements(1): deleting element 2001:db8::10 from set masquerade6",
            "deleteChain: deleting chain pick6-tcp-2 (with its rule)",
        ])
    }

    @Test("a changed comment (the port renamed) replaces the dispatch entry only")
    func commentChanged() throws {
        let old = try Self.plan(Self.specs())
        var specs = Self.specs()
        specs[1].ports = [("domain", .udp, 53, 53)]
        #expect(Self.summary(try Self.changes(old, try Self.plan(specs))) == [
            "deleteElements(1): deleting element 203.0.113.11 . udp . 53 comment \"default/dns:dns\" : goto pick4-udp-1 from map dispatch4",
            "newElements(1)!: adding element 203.0.113.11 . udp . 53 comment \"default/dns:domain\" : goto pick4-udp-1 to map dispatch4",
        ])
    }

    @Test("equal plans change nothing; settings changes are not incremental; invalid plans are refused")
    func noChangeAndSettings() throws {
        let old = try Self.plan(Self.specs())
        #expect(try RulesetProgram.changes(from: old, to: try Self.plan(Self.specs()))?.isEmpty == true)
        #expect(try NftablesNetlink.describeUpdate(from: old, to: old) == [])
        for settings in [PlanSettings(table: "other"), PlanSettings(priority: -101), PlanSettings(masquerade: false)] {
            #expect(try RulesetProgram.changes(from: old, to: try Self.plan(Self.specs(), settings: settings)) == nil)
            #expect(try NftablesNetlink.describeUpdate(from: old, to: try Self.plan(Self.specs(), settings: settings)) == nil)
        }
        // The iptables chain name and the conflict policy are not part of the nftables table.
        #expect(try RulesetProgram.changes(from: old, to: try Self.plan(Self.specs(), settings: PlanSettings(chain: "X", onConflict: .skip)))?.isEmpty == true)
        // A kube-proxy target plan cannot be the new plan (nothing is sent), nor the old one (full replace).
        let kubeProxy = try Fixtures.plan(Self.specs(), strategy: .kubeProxy)
        #expect(throws: NetlinkError.self) { try RulesetProgram.changes(from: old, to: kubeProxy) }
        #expect(try RulesetProgram.changes(from: kubeProxy, to: old) == nil)
        // From and to an empty plan: everything added / deleted, as elements and pick chains.
        let empty = try Self.plan([])
        let all = RulesetProgram.counts(try Self.changes(empty, old))
        #expect(all.elementsAdded == NftablesNetlink.elementCount(old) && all.elementsDeleted == 0)
        #expect(all.chainsAdded == old.nftPickChains.count)
        let none = RulesetProgram.counts(try Self.changes(old, empty))
        #expect(none.elementsDeleted == NftablesNetlink.elementCount(old) && none.chainsDeleted == old.nftPickChains.count)
    }

    @Test("one endpoint less in a 10,000-mapping plan: a handful of elements, linear work")
    func largePlanOneEndpoint() throws {
        let endpoints = (1...8).map { "192.0.2.\(100 + $0)" }
        func plan(_ eps: [String]) throws -> RulePlan {
            try Self.plan(Fixtures.largeSpecs(mappings: 10_000, maxEndpoints: 10)
                          + [ServiceSpec(name: "one", ips: ["192.0.2.1"], ports: [("http", .tcp, 80, 8080)], endpoints4: eps)])
        }
        let old = try plan(endpoints)
        var fewer = endpoints
        fewer.remove(at: 2)
        let new = try plan(fewer)
        #expect(old.rules.count == 10_001)
        // The in-place walks equal the planner's own.
        #expect(RulesetProgram.pickChains(old) == old.nftPickChains)
        #expect(RulesetProgram.externalAddresses(old, .ipv4) == old.externalAddresses(.ipv4))
        #expect(RulesetProgram.externalAddresses(old, .ipv6) == old.externalAddresses(.ipv6))
        let start = Date()
        let ops = try #require(try RulesetProgram.changes(from: old, to: new))
        let seconds = Date().timeIntervalSince(start)
        let c = RulesetProgram.counts(ops)
        print("10k mappings, one endpoint less: \(ops.count) operations, \(c) in \(String(format: "%.3f", seconds)) s")
        // Dispatch entry out and in (pick4-tcp-8 → pick4-tcp-7, both used by other services), slots 2…7 out,
        // 2…6 in: 2 + 6 + 5 elements, in 4 messages.
        #expect(c.elementsAdded == 6 && c.elementsDeleted == 7 && c.chainsAdded == 0 && c.chainsDeleted == 0)
        #expect(c.elementsAdded + c.elementsDeleted + c.chainsAdded + c.chainsDeleted <= 20)
        #expect(ops.count == 4)
        var model = try KernelModel(NetlinkUnitTests.simulatedDump(old))
        try model.commit(ops)
        #expect(RulesetDecoder.decode(model.dump) == NftablesNetlink.expected(new))
    }

    @Test("keys are matched by merging the planner's sorted rules, or through a hash index in any other order")
    func partners() throws {
        let old = try Self.plan(Self.specs()).rules
        var specs = Self.specs()
        specs[0].ips = ["203.0.113.10"]  // web's IPv6 mapping goes
        let new = try Self.plan(specs + [ServiceSpec(name: "mail", ips: ["192.0.2.25"], ports: [("smtp", .tcp, 25, 2525)],
                                                     endpoints4: ["198.51.100.25"])]).rules
        let merged = try #require(RulesetProgram.partners(old: old, new: new))
        // Every new rule's partner has its key; the keys without a partner are the new ones.
        func key(_ r: PlannedRule) -> String { "\(r.mapping.externalIP) \(r.mapping.protocol) \(r.mapping.port)" }
        #expect(new.indices.filter { merged[$0] < 0 }.map { key(new[$0]) } == ["192.0.2.25 tcp 25"])
        #expect(new.indices.allSatisfy { merged[$0] < 0 || key(old[Int(merged[$0])]) == key(new[$0]) })
        #expect(Set(merged.filter { $0 >= 0 }).count == old.count - 1)
        // Unsorted: the hash path finds the same partners (by key).
        let shuffled = Array(old.reversed())
        let hashed = try #require(RulesetProgram.partners(old: shuffled, new: new))
        #expect(new.indices.allSatisfy { (merged[$0] < 0) == (hashed[$0] < 0) })
        #expect(new.indices.allSatisfy { hashed[$0] < 0 || key(shuffled[Int(hashed[$0])]) == key(new[$0]) })
        // A key twice: nil (full replace).
        #expect(RulesetProgram.partners(old: old + [old[0]], new: new) == nil)
        #expect(RulesetProgram.partners(old: old, new: [new[0], new[0]]) == nil)
    }

    @Test("the kernel model refuses what the kernel refuses: a missing element, an existing one, a chain still in use")
    func modelRefuses() throws {
        let old = try Self.plan(Self.specs())
        let new = try Self.plan(Self.specs(web4: ["198.51.100.5", "198.51.100.7"]))
        let ops = try #require(try RulesetProgram.changes(from: old, to: new))
        // Applying the same changes twice: the deletes find nothing.
        var model = try KernelModel(NetlinkUnitTests.simulatedDump(old))
        try model.commit(ops)
        #expect(throws: KernelModel.Refused.self) { try model.commit(ops) }
        // A chain delete before the element that jumps to it is gone.
        let back = try #require(try RulesetProgram.changes(from: new, to: try Self.plan(Self.specs(web6: ["2001:db8::5"]))))
        var reordered = back
        if let last = reordered.popLast() { reordered.insert(last, at: 0) }
        var model2 = try KernelModel(NetlinkUnitTests.simulatedDump(new))
        #expect(throws: KernelModel.Refused.self) { try model2.commit(reordered) }
    }
}

extension NetlinkUpdateUnitTests {
    /// One nf_tables notification as the kernel sends it: nlmsghdr, nfgenmsg, attributes.
    static func notification(_ message: UInt16, family: UInt8 = 1, port: UInt32, attributes: [(UInt16, [UInt8])]) -> [UInt8] {
        func le(_ v: UInt32) -> [UInt8] { Nft.hostOrder(v) }
        var body: [UInt8] = [family, 0, 0, 0]
        for (type, value) in attributes {
            let len = UInt32(4 + value.count)
            body += Array(le(len).prefix(2)) + Array(le(UInt32(type)).prefix(2)) + value
            body += [UInt8](repeating: 0, count: NetlinkWire.align4(value.count) - value.count)
        }
        return le(UInt32(16 + body.count)) + Array(le(UInt32(10 << 8 | message)).prefix(2)) + [0, 0] + le(7) + le(port) + body
    }

    @Test("notifications: a transaction that names our inet table and was committed by a foreign socket is a change")
    func notificationFilter() throws {
        let ours: UInt32 = 4242
        var filter = NftChangeFilter(table: "hnd", isOwnPort: { $0 == ours })
        func feed(_ bytes: [UInt8]) -> [NftablesChange] {
            NetlinkParse.messages(in: bytes).compactMap { NftNotification.parse($0, in: bytes) }.compactMap { filter.consume($0) }
        }
        let name = Array("hnd\0".utf8)
        let gen = { (port: UInt32) in
            Self.notification(15, family: 0, port: port, attributes: [(1, [0, 0, 1, 2]), (2, [0, 0, 0x30, 0x39]), (3, Array("nft\0".utf8))])
        }
        let delElement = Self.notification(14, port: 99, attributes: [(1, name), (2, Array("endpoints4\0".utf8))])
        let parsed = try #require(NftNotification.parse(NetlinkParse.messages(in: delElement)[0], in: delElement))
        #expect(parsed == NftNotification(message: 14, family: 1, table: "hnd", portID: 99, generation: nil, processID: nil, processName: nil))
        // Foreign: reported once, at its NEWGEN.
        #expect(feed(delElement) == [])
        #expect(feed(gen(99)) == [NftablesChange(generation: 258, processID: 12345, processName: "nft", lostNotifications: false)])
        // Ours (several messages in one datagram): nothing.
        #expect(feed(delElement + Self.notification(3, port: ours, attributes: [(1, name)]) + gen(ours)) == [])
        // Another table, or our table's name in another family: nothing.
        #expect(feed(Self.notification(0, port: 99, attributes: [(1, Array("other\0".utf8))]) + gen(99)) == [])
        #expect(feed(Self.notification(2, family: 2, port: 99, attributes: [(1, name)]) + gen(99)) == [])
        // A generation that touched nothing of ours after one that did: only the first counts.
        #expect(feed(Self.notification(2, port: 99, attributes: [(1, name)]) + gen(99) + gen(99)).count == 1)
        // Not nf_tables (another subsystem): ignored.
        var ct = delElement
        ct[5] = 1
        #expect(NftNotification.parse(NetlinkParse.messages(in: ct)[0], in: ct) == nil)
    }
}

/// What the kernel checks for the operations of an incremental batch, on a dumped table: deletes need the
/// key, exclusive adds need its absence, a new chain or set must not exist, a deleted chain must exist and no
/// element may still jump to it, a deleted set must exist and no rule may still look it up, a rule's chain
/// and sets and an element's set must exist. All or nothing, like the kernel.
struct KernelModel {
    struct Refused: Error, CustomStringConvertible { var description: String }
    private(set) var dump: DumpedTable

    init(_ dump: DumpedTable) { self.dump = dump }

    mutating func commit(_ ops: [NftOperation]) throws {
        var d = dump
        var elements = d.elements.mapValues { Dictionary($0.map { ($0.key, $0) }, uniquingKeysWith: { a, _ in a }) }
        for op in ops {
            switch op.kind {
            case .newChain(let c):
                if d.chains.contains(where: { $0.name == c.name }) {
                    if op.exclusive { throw Refused(description: "EEXIST: \(op.description)") }
                } else {
                    d.chains.append(c)
                }
            case .newRule(let r):
                guard d.chains.contains(where: { $0.name == r.chain }) else { throw Refused(description: "ENOENT: \(op.description)") }
                for set in Self.sets(r) where !d.sets.contains(where: { $0.name == set }) {
                    throw Refused(description: "ENOENT (set \(set)): \(op.description)")
                }
                d.rules.append(r)
            case .flushChain(let c):
                guard d.chains.contains(where: { $0.name == c.name }) else { throw Refused(description: "ENOENT: \(op.description)") }
                d.rules.removeAll { $0.chain == c.name }
            case .newSet(var s):
                if d.sets.contains(where: { $0.name == s.name }) {
                    if op.exclusive { throw Refused(description: "EEXIST: \(op.description)") }
                } else {
                    s.id = nil  // as the kernel dumps it (see NetlinkUnitTests.simulatedDump)
                    if s.dataType == Nft.dataVerdict { s.dataLength = 16 }
                    d.sets.append(s)
                }
            case .deleteSet(let s):
                guard d.sets.contains(where: { $0.name == s.name }) else { throw Refused(description: "ENOENT: \(op.description)") }
                if d.rules.contains(where: { Self.sets($0).contains(s.name) }) { throw Refused(description: "EBUSY: \(op.description)") }
                d.sets.removeAll { $0.name == s.name }
                elements[s.name] = nil
            case .deleteChain(let c):
                guard d.chains.contains(where: { $0.name == c.name }) else { throw Refused(description: "ENOENT: \(op.description)") }
                if elements.values.contains(where: { $0.values.contains { $0.verdict?.chain == c.name } }) {
                    throw Refused(description: "EBUSY: \(op.description)")
                }
                d.chains.removeAll { $0.name == c.name }
                d.rules.removeAll { $0.chain == c.name }
            case .newElements(let s, let es):
                guard d.sets.contains(where: { $0.name == s.name }) else { throw Refused(description: "ENOENT (set): \(op.description)") }
                for e in es {
                    if elements[s.name]?[e.key] != nil {
                        if op.exclusive { throw Refused(description: "EEXIST: \(op.description)") }
                        continue
                    }
                    if let chain = e.verdict?.chain, !d.chains.contains(where: { $0.name == chain }) {
                        throw Refused(description: "ENOENT (chain): \(op.description)")
                    }
                    elements[s.name, default: [:]][e.key] = e
                }
            case .deleteElements(let s, let es):
                for e in es {
                    guard elements[s.name]?.removeValue(forKey: e.key) != nil else { throw Refused(description: "ENOENT: \(op.description)") }
                }
            case .newTable, .deleteTable:
                throw Refused(description: "not an incremental operation: \(op.description)")
            }
        }
        d.elements = elements.mapValues { Array($0.values) }
        dump = d
    }

    /// The sets a rule looks up or updates.
    static func sets(_ r: NftRule) -> [String] {
        r.expressions.compactMap { e in
            switch e {
            case .lookup(let set, _, _, _, _), .dynset(_, _, let set, _): return set
            default: return nil
            }
        }
    }
}
