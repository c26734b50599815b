import Foundation
import KubeObjects
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import RuleRendering
import ServiceResolution
import Testing
import TestSupport

/// Everything here runs in throwaway network namespaces; the host's ruleset is never touched.
@Suite("netlink backend in network namespaces", .serialized)
struct NetlinkKernelTests {
    static let table = "hnd-test"

    static let variants: [(String, Int, Bool)] = [
        ("default", -99, true),
        ("before kube-proxy, no masquerade", -101, false),
        ("masquerade, -101", -101, true),
        ("no masquerade, -99", -99, false),
    ]

    @Test("netlink apply lists exactly like nft -f of the rendered script", arguments: 0..<4)
    func matchesNft(variant: Int) throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let (_, priority, masquerade) = Self.variants[variant]
        let plan = try Fixtures.samplePlan(table: Self.table, priority: priority, masquerade: masquerade)
        try withNamespaces(2, label: "parity") { ns in
            try ns[0].backend.apply(plan)
            try ns[1].nftScript(try NftRenderer.render(plan))
            let viaNetlink = try ns[0].nft("list", "table", "inet", Self.table)
            let viaNft = try ns[1].nft("list", "table", "inet", Self.table)
            #expect(normalizeListing(viaNetlink) == normalizeListing(viaNft))
            // The kernel's own view (expressions, registers, element bytes, rule userdata) is the same too.
            #expect(try kernelView(ns[0], Self.table) == kernelView(ns[1], Self.table))
            // The sets' attributes and userdata (typeof key and data expressions) byte for byte.
            let (a, b) = (try setAttributes(ns[0], Self.table), try setAttributes(ns[1], Self.table))
            #expect(a == b)
            #expect(a.count == (masquerade ? 6 : 4))
            // The table's userdata (the ownership comment) byte for byte, as nft wrote it.
            let ta = try #require(try ns[0].backend.dumpTable(family: .inet, name: Self.table)).table
            let tb = try #require(try ns[1].backend.dumpTable(family: .inet, name: Self.table)).table
            #expect(ta.userdata == tb.userdata)
            #expect(tb.userdata.map(hex) == "0018" + hex(Array("managed by hostnet-dnat\0".utf8)))
            #expect(viaNetlink.contains("\tcomment \"managed by hostnet-dnat\"\n"))
            #expect(viaNetlink.contains("typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport"))
            #expect(viaNetlink.contains("typeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport"))
            // (nft 1.0.6 lists `meta l4proto tcp … th dport` as `tcp dport`.)
            #expect(viaNetlink.contains("dnat ip6 to ip6 daddr . meta l4proto . tcp dport . numgen random mod 3 map @endpoints6"))
            #expect(viaNetlink.contains("comment \"default/web:https\" : goto pick4-tcp-2"))
            #expect(viaNetlink.contains("priority \(priority);"))
            #expect(viaNetlink.contains("masquerade4") == masquerade)
        }
    }

    @Test("an empty plan, an IPv4-only plan and 2000 mappings of 1-10 endpoints list like nft -f too")
    func matchesNftOtherPlans() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let plans = [
            try Fixtures.plan([], settings: PlanSettings(table: Self.table)),
            try Fixtures.plan([ServiceSpec(name: "one", ips: ["192.0.2.80"], ports: [("", .tcp, 80, 8080)], endpoints4: ["198.51.100.80"])],
                              settings: PlanSettings(table: Self.table)),
            try Fixtures.largePlan(mappings: 2_000, maxEndpoints: 10, table: Self.table),
        ]
        for plan in plans {
            try withNamespaces(2, label: "parity-other") { ns in
                try ns[0].backend.apply(plan)
                try ns[1].nftScript(try NftRenderer.render(plan))
                #expect(normalizeListing(try ns[0].nft("list", "table", "inet", Self.table))
                        == normalizeListing(try ns[1].nft("list", "table", "inet", Self.table)))
                #expect(try kernelView(ns[0], Self.table) == kernelView(ns[1], Self.table))
                #expect(try setAttributes(ns[0], Self.table) == setAttributes(ns[1], Self.table))
                #expect(try ns[0].backend.read(table: Self.table) == NftablesNetlink.expected(plan))
                #expect(try ns[1].backend.read(table: Self.table) == NftablesNetlink.expected(plan))
            }
        }
    }

    @Test("read(table:) decodes what apply (or nft -f) installed, and reports nft-side changes")
    func readback() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let plan = try Fixtures.samplePlan(table: Self.table)
        let expected = NftablesNetlink.expected(plan)
        #expect(expected.mappings.count == plan.rules.count)
        try withNamespaces(2, label: "readback") { ns in
            let backend = ns[0].backend
            #expect(try backend.read(table: Self.table) == nil)
            #expect(InstalledRuleset.differences(installed: nil, expected: expected).first == "+ table inet \(Self.table)")

            try backend.apply(plan)
            let installed = try #require(try backend.read(table: Self.table))
            #expect(installed == expected)
            #expect(installed.differences(to: expected).isEmpty)
            #expect(installed.outputPriority == -99 && installed.masqueradePriority == 100)
            #expect(installed.masqueradeAddresses.map(\.description) == ["203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.13",
                                                                         "2001:db8::10", "2001:db8::12"])
            let web = try #require(installed.mappings.first { $0.externalIP.description == "2001:db8::10" && $0.port == 443 })
            #expect(web.destinations.map(\.description) == ["[2001:db8::5]:8443", "[2001:db8::6]:8443", "[2001:db8::7]:8443"])
            #expect(web.comment == "default/web:https")

            // A table made by nft from the rendered script decodes to the same thing.
            try ns[1].nftScript(try NftRenderer.render(plan))
            #expect(try ns[1].backend.read(table: Self.table) == expected)

            // nft-side changes show up as differences.
            let t = Self.table
            try ns[0].nft("add", "element", "inet", t, "endpoints4",
                          "{ 203.0.113.99 . tcp . 8443 . 0 : 198.51.100.5 . 8443, 203.0.113.99 . tcp . 8443 . 1 : 198.51.100.6 . 8443 }")
            try ns[0].nft("add", "element", "inet", t, "dispatch4", "{ 203.0.113.99 . tcp . 8443 comment \"x/y:z\" : goto pick4-tcp-2 }")
            try ns[0].nft("delete", "element", "inet", t, "dispatch4", "{ 203.0.113.11 . udp . 53 }")
            try ns[0].nft("delete", "element", "inet", t, "endpoints4", "{ 203.0.113.10 . tcp . 443 . 1 }")
            try ns[0].nft("add", "element", "inet", t, "masquerade4", "{ 203.0.113.99 }")
            try ns[0].nft("add", "chain", "inet", t, "stray")
            let changed = try #require(try backend.read(table: t))
            #expect(changed != expected)
            let diff = changed.differences(to: expected)
            #expect(diff == [
                "- masquerade 203.0.113.99",
                "- 203.0.113.10 tcp/443 -> ? (default/web:https)",
                "+ 203.0.113.10 tcp/443 -> 198.51.100.5:8443, 198.51.100.6:8443 (default/web:https)",
                "+ 203.0.113.11 udp/53 -> 198.51.100.7:53 (default/dns:dns)",
                "- 203.0.113.99 tcp/8443 -> 198.51.100.5:8443, 198.51.100.6:8443 (x/y:z)",
                "- chain pick4-udp-1 is not used by any dispatch entry",
                "- chain stray is not used by any dispatch entry",
                "- chain stray: 0 rules instead of one pick rule",
                "- map endpoints4: element 203.0.113.10 . tcp . 443 (numgen mod 2 in chain pick4-tcp-2) has no slot 1",
                "- map endpoints4: elements for 203.0.113.11 . udp . 53 have no dispatch entry",
            ], "\(diff)")

            // A pick chain whose modulus no longer matches its name.
            try backend.apply(plan)
            // (nft 1.0.6 cannot add a rule that uses the typeof map to an existing table: "conflicting protocols
            // specified: tcp vs. th"; so the new rule goes in over netlink.)
            try ns[0].nft("flush", "chain", "inet", t, "pick6-tcp-3")
            var exprs = RulesetProgram.pickRule(family: .ipv6, protocol: .tcp, count: 2)
            exprs[8] = .lookup(set: "endpoints6", setID: nil, sreg: Nft.reg1, dreg: Nft.reg1, flags: nil)
            let session = try NetlinkSession.open(in: ns[0].netns)
            _ = try NetlinkBatch([NftOperation(kind: .newRule(NftRule(family: .inet, table: t, chain: "pick6-tcp-3", expressions: exprs, userdata: nil)),
                                               description: "adding a mod 2 pick rule")]).commit(on: session.socket)
            #expect(try ns[0].nft("list", "chain", "inet", t, "pick6-tcp-3").contains("numgen random mod 2 map @endpoints6"))
            let modulus = try #require(try backend.read(table: t)).differences(to: expected)
            #expect(modulus.contains("- chain pick6-tcp-3 picks among 2 ip6 tcp endpoints (its name should be pick6-tcp-2)"), "\(modulus)")
            #expect(modulus.contains("- 2001:db8::10 tcp/443 -> [2001:db8::5]:8443, [2001:db8::6]:8443 (default/web:https)"))
            #expect(modulus.contains("- map endpoints6: slot(s) 2 of 2001:db8::10 . tcp . 80 are never picked (numgen mod 2 in chain pick6-tcp-3)"))

            // A changed priority is a difference too; applying again repairs everything.
            let other = try Fixtures.samplePlan(table: Self.table, priority: -101)
            #expect(changed.differences(to: NftablesNetlink.expected(other)).contains("+ output chain priority -101"))
            try backend.apply(plan)
            #expect(try backend.read(table: Self.table) == expected)
        }
    }

    @Test("traffic to external IPs reaches both endpoints, and stops after remove", arguments: [false, true])
    func traffic(ipv6: Bool) throws {
        guard try requireKernelTests(tools: ["python3"]) else { return }
        let ext = ipv6 ? "2001:db8:e::10" : "203.0.113.10"
        let podA = ipv6 ? "2001:db8:2::5" : "198.51.100.5"
        let podB = ipv6 ? "2001:db8:2::6" : "198.51.100.6"
        let plan = try Fixtures.plan([
            ServiceSpec(name: "web", ips: [ext], ports: [("http", .tcp, 80, 8080), ("echo", .udp, 7, 7007)],
                        endpoints4: ipv6 ? [] : [podA, podB], endpoints6: ipv6 ? [podA, podB] : []),
        ], settings: PlanSettings(table: Self.table))
        try withNamespaces(2, label: "traffic") { ns in
            let (node, pod) = (ns[0], ns[1])
            try connect(node, pod, aAddresses: ["198.51.100.1/24", "2001:db8:2::1/64"], bAddresses: ["198.51.100.5/24", "2001:db8:2::5/64"])
            try addAddresses(pod, ["198.51.100.6/24", "2001:db8:2::6/64"])
            let specs: [(namespace: TestNamespace, transport: TestTransport, address: String, port: Int, name: String)] = [
                (pod, .tcp, podA, 8080, "a"), (pod, .tcp, podB, 8080, "b"), (pod, .udp, podA, 7007, "a"), (pod, .udp, podB, 7007, "b"),
            ]
            try withEchoServers(specs) { _ in
                // Nothing answers on the external IP before apply.
                #expect(try exchange(from: node, .tcp, host: ext, port: 80, count: 1, timeout: 0.5).allSatisfy { !$0.succeeded })

                let report = try node.backend.apply(plan)
                #expect(report.mappings == 2)
                for transport in TestTransport.allCases {
                    let port = transport == .tcp ? 80 : 7
                    let replies = try exchange(from: node, transport, host: ext, port: port, count: 40, timeout: 2)
                    #expect(replies.count == 40)
                    #expect(replies.allSatisfy { $0.succeeded }, "\(transport): \(replies)")
                    #expect(Set(replies.compactMap(\.server)) == ["a", "b"], "\(transport) used only \(Set(replies.compactMap(\.server)))")
                }

                #expect(try node.backend.remove(table: Self.table))
                for transport in TestTransport.allCases {
                    let replies = try exchange(from: node, transport, host: ext, port: transport == .tcp ? 80 : 7, count: 3, timeout: 0.5)
                    #expect(replies.allSatisfy { !$0.succeeded }, "\(transport) still answered after remove: \(replies)")
                }
            }
        }
    }

    @Test("a batch the kernel refuses names the operation and leaves the previous ruleset byte-identical")
    func refusedBatchIsAtomic() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let good = try Fixtures.samplePlan(table: Self.table)
        // nat base chains must run after conntrack (priority -200): the kernel answers EOPNOTSUPP.
        let bad = try Fixtures.samplePlanTheKernelRefuses(table: Self.table)
        try withNamespace("refused") { ns in
            try ns.nftScript("table ip nat {\n\tchain KUBE-SERVICES {\n\t}\n}\n")
            try ns.backend.apply(good)
            let before = try ns.ruleset()
            if let error = netlinkError({ try ns.backend.apply(bad) }) {
                #expect(error.kind == .rejected)
                #expect(error.errno == 95)  // EOPNOTSUPP
                #expect(error.operation == "adding chain output (type nat hook output priority -300)")
                #expect(error.description.contains("adding chain output"))
                #expect(!error.isPermissionDenied && !error.isUnavailable)
            }
            #expect(try ns.ruleset() == before)
            #expect(try ns.backend.read(table: Self.table) == NftablesNetlink.expected(good))
        }
    }

    @Test("an element error is mapped back to that element through the extended ack offset")
    func elementErrorMapping() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let plan = try Fixtures.samplePlan(table: Self.table)
        var ops = try RulesetProgram.operations(plan)
        // Point the third dispatch4 element at a chain that does not exist.
        let i = try #require(ops.firstIndex { if case .newElements(let s, let e) = $0.kind { return s.name == "dispatch4" && e.count > 2 }; return false })
        guard case .newElements(let set, var elements) = ops[i].kind else { return }
        elements[2].verdict = NftVerdict(code: Nft.verdictGoto, chain: "no-such-chain")
        ops[i].kind = .newElements(set, elements)
        try withNamespace("elemerr") { ns in
            try ns.backend.apply(plan)
            let before = try ns.ruleset()
            let session = try NetlinkSession.open(in: ns.netns)
            if let error = netlinkError({ try NetlinkBatch(ops).commit(on: session.socket) }) {
                #expect(error.errno == 2)  // ENOENT
                #expect(error.operation == ops[i].elementDescription(2), "\(error)")
                #expect(error.operation == "adding element 203.0.113.11 . tcp . 53 comment \"default/dns:dns-tcp\" : goto pick4-tcp-1 to map dispatch4")
            }
            #expect(try ns.ruleset() == before)
        }
    }

    @Test("a rule error is mapped back to the failing expression through the extended ack offset")
    func expressionErrorMapping() throws {
        guard try requireKernelTests() else { return }
        let plan = try Fixtures.samplePlan(table: Self.table)
        var ops = try RulesetProgram.operations(plan)
        // The IPv6 dispatch rule looks up a map that does not exist.
        let i = try #require(ops.firstIndex { $0.description.hasSuffix("vmap @dispatch6") })
        guard case .newRule(var rule) = ops[i].kind else { return }
        rule.expressions[5] = .lookup(set: "nosuch", setID: nil, sreg: Nft.reg1, dreg: Nft.regVerdict, flags: nil)
        ops[i].kind = .newRule(rule)
        ops[i].expressionDescriptions = rule.expressions.map(\.description)
        try withNamespace("exprerr") { ns in
            let session = try NetlinkSession.open(in: ns.netns)
            if let error = netlinkError({ try NetlinkBatch(ops).commit(on: session.socket) }) {
                #expect(error.errno == 2)  // ENOENT
                #expect(error.operation == ops[i].description + " (expression 6: lookup reg 1 set nosuch dreg 0)", "\(error)")
            }
            #expect(try ns.ruleset().isEmpty)
        }
    }

    @Test("applying twice equals applying once; remove leaves nothing; other tables stay byte-identical")
    func idempotenceAndIsolation() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let plan = try Fixtures.samplePlan(table: Self.table)
        let others = """
        table ip nat {
        \tchain KUBE-SERVICES {
        \t}
        \tchain OUTPUT {
        \t\ttype nat hook output priority -100; policy accept;
        \t\tjump KUBE-SERVICES
        \t}
        }
        table ip kube-proxy {
        \tchain services {
        \t\tip daddr 192.0.2.99 tcp dport 80 accept
        \t}
        }
        table inet hnd-test-other {
        \tset s {
        \t\ttype ipv4_addr
        \t\telements = { 192.0.2.1 }
        \t}
        }

        """
        try withNamespace("idem") { ns in
            try ns.nftScript(others)
            let othersBefore = try ns.ruleset()
            let backend = ns.backend

            #expect(try backend.tableExists(family: .ip, name: "kube-proxy"))
            #expect(try !backend.tableExists(family: .inet, name: "kube-proxy"))
            #expect(try backend.chainExists(family: .ip, table: "nat", chain: "KUBE-SERVICES"))
            #expect(try !backend.chainExists(family: .ip, table: "nat", chain: "KUBE-NODEPORTS"))
            #expect(try !backend.chainExists(family: .ip6, table: "nat", chain: "KUBE-SERVICES"))

            try backend.apply(plan)
            let once = try ns.nft("list", "table", "inet", Self.table)
            try backend.apply(plan)
            let twice = try ns.nft("list", "table", "inet", Self.table)
            #expect(normalizeListing(once) == normalizeListing(twice))
            #expect(try backend.read(table: Self.table) == NftablesNetlink.expected(plan))
            for (family, table) in [("ip", "nat"), ("ip", "kube-proxy"), ("inet", "hnd-test-other")] {
                #expect(othersBefore.contains(try ns.nft("list", "table", family, table)))
            }

            #expect(try backend.remove(table: Self.table))
            #expect(try ns.ruleset() == othersBefore)
            #expect(try backend.read(table: Self.table) == nil)
            #expect(try !backend.remove(table: Self.table))
            #expect(try ns.ruleset() == othersBefore)
        }
    }

    @Test("a table of that name that is not ours (no ownership comment) is never replaced or deleted")
    func foreignTables() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        // firewalld's own table, one with some other comment, and one an older hostnet-dnat left (no comment).
        let old = try NftRenderer.render(try Fixtures.samplePlan(table: "hnd-old"))
            .replacingOccurrences(of: "\tcomment \"managed by hostnet-dnat\"\n", with: "")
        #expect(!old.contains("managed by"))
        let foreign = """
        table inet firewalld {
        \tchain filter_INPUT {
        \t\ttype filter hook input priority 10; policy accept;
        \t\tip saddr 192.0.2.7 tcp dport 22 accept
        \t}
        }
        table inet commented {
        \tcomment "someone else's"
        \tchain c {
        \t\tip daddr 192.0.2.8 drop
        \t}
        }

        """
        try withNamespace("foreign") { ns in
            try ns.nftScript(foreign)
            try ns.nftScript(old)
            // With handles: a table that was replaced, even by an identical one, lists with new handles.
            let before = try ns.nft("-a", "list", "ruleset")
            let viewBefore = try kernelView(ns, "firewalld")
            let backend = ns.backend
            for name in ["firewalld", "commented", "hnd-old"] {
                let plan = try Fixtures.samplePlan(table: name)
                let attempts: [(String, () throws -> Any)] = [
                    ("replace", { try backend.apply(plan) }),
                    ("delete", { try backend.remove(table: name) }),
                    ("replace", { try backend.requireOwnership(table: name) }),
                ]
                for (verb, attempt) in attempts {
                    guard let error = netlinkError(attempt) else { continue }
                    #expect(error.kind == .foreignTable)
                    #expect(error.description.hasPrefix("table inet \(name) exists and was not created by hostnet-dnat "
                                                        + "(no \"managed by hostnet-dnat\" comment"), "\(error)")
                    #expect(error.description.contains("refusing to \(verb) it: choose another --table"), "\(error)")
                    #expect(error.description.contains("older than this mark"))
                    #expect(error.description.contains("its comment is \"someone else's\"") == (name == "commented"))
                    #expect(try ns.nft("-a", "list", "ruleset") == before)
                }
                // read(table:) shows it, and the differences say so.
                let read = try #require(try backend.read(table: name))
                let anomaly = "table inet \(name) was not created by hostnet-dnat (no comment \"managed by hostnet-dnat\""
                #expect(read.anomalies.contains { $0.hasPrefix(anomaly) }, "\(read.anomalies)")
                #expect(read.differences(to: NftablesNetlink.expected(plan)).contains { $0.hasPrefix("- " + anomaly) })
            }
            // The old hostnet-dnat table is otherwise exactly ours: the comment is its only anomaly.
            #expect(try backend.read(table: "hnd-old")?.anomalies
                    == ["table inet hnd-old was not created by hostnet-dnat (no comment \"managed by hostnet-dnat\")"])
            #expect(try kernelView(ns, "firewalld") == viewBefore)

            // Our own table, whether nft -f of the rendered script or the netlink backend made it, is replaced
            // and removed as before, and the others stay byte-identical.
            let plan = try Fixtures.samplePlan(table: Self.table)
            let other = try Fixtures.samplePlan(table: Self.table, priority: -101, masquerade: false)
            try ns.nftScript(try NftRenderer.render(plan))
            #expect(try backend.requireOwnership(table: Self.table))
            #expect(try !backend.requireOwnership(table: "hnd-absent"))
            try backend.apply(other)
            #expect(try backend.read(table: Self.table) == NftablesNetlink.expected(other))
            try backend.apply(plan)
            #expect(try backend.read(table: Self.table) == NftablesNetlink.expected(plan))
            #expect(try backend.remove(table: Self.table))
            #expect(try !backend.remove(table: Self.table))
            #expect(try ns.nft("-a", "list", "ruleset") == before)
        }
    }

    @Test("concurrent applies of two plans leave one of them, never a mix")
    func concurrentApplies() throws {
        guard try requireKernelTests() else { return }
        let planA = try Fixtures.samplePlan(table: Self.table)
        let planB = try Fixtures.plan([
            ServiceSpec(name: "other", ips: ["192.0.2.50", "2001:db8::50"], ports: [("x", .tcp, 443, 443), ("y", .udp, 443, 443)],
                        endpoints4: ["198.51.100.50", "198.51.100.51"], endpoints6: ["2001:db8::51"]),
        ], settings: PlanSettings(table: Self.table, priority: -101, masquerade: false))
        let expectedA = NftablesNetlink.expected(planA), expectedB = NftablesNetlink.expected(planB)
        try withNamespace("concurrent") { ns in
            let backend = ns.backend
            // The table exists before the threads start: while the kernel commits the very first batch (table
            // absent), the batch's empty "create if missing" table is visible to readers for a moment (seen
            // on 6.18; `nft -f` of the rendered script does the same). Replacing an existing table never shows it.
            try backend.apply(planA)
            let errors = ErrorList()
            let observed = ErrorList()
            let reads = ErrorList()
            // Real threads (not a pool sized to the cores), so that both writers and the reader overlap.
            let done = DispatchGroup()
            for worker in 0..<3 {
                done.enter()
                let thread = Thread {
                    defer { done.leave() }
                    for _ in 0..<25 {
                        do {
                            switch worker {
                            case 0: try backend.apply(planA)
                            case 1: try backend.apply(planB)
                            default:
                                if let seen = try backend.read(table: Self.table) {
                                    if seen == expectedA { reads.add("A") } else if seen == expectedB { reads.add("B") } else {
                                        observed.add("a reader saw a mix: \(seen.differences(to: expectedA).prefix(5))")
                                    }
                                }
                            }
                        } catch {
                            errors.add("\(error)")
                        }
                    }
                }
                thread.start()
            }
            done.wait()
            #expect(errors.items.isEmpty, "\(errors.items)")
            #expect(observed.items.isEmpty, "\(observed.items)")
            #expect(!reads.items.isEmpty)
            print("concurrent reads saw plan A \(reads.items.filter { $0 == "A" }.count)x, plan B \(reads.items.filter { $0 == "B" }.count)x")
            let final = try #require(try backend.read(table: Self.table))
            #expect(final == expectedA || final == expectedB)
        }
    }

    @Test("a 20,000-mapping plan applies in one batch and reads back")
    func largePlan() throws {
        guard try requireKernelTests() else { return }
        let plan = try Fixtures.largePlan(mappings: 20_000, maxEndpoints: 10, table: Self.table)
        #expect(plan.rules.count == 20_000)
        try withNamespace("large") { ns in
            let report = try ns.backend.apply(plan)
            print("apply of \(report.mappings) mappings, \(report.pickChains) pick chains, \(report.elements) elements: "
                  + "\(report.messages) messages, \(report.bytes) bytes, \(String(format: "%.2f", report.seconds)) s")
            #expect(report.mappings == 20_000)
            let start = Date()
            let installed = try #require(try ns.backend.read(table: Self.table))
            print("read back in \(String(format: "%.2f", Date().timeIntervalSince(start))) s")
            #expect(installed == NftablesNetlink.expected(plan))
            // And once more over the existing table (replacing 20k mappings is the same single batch).
            let again = try ns.backend.apply(plan)
            print("re-apply: \(String(format: "%.2f", again.seconds)) s")
            #expect(try ns.backend.read(table: Self.table) == NftablesNetlink.expected(plan))
        }
    }
}

/// `nft --debug=netlink list table` (expressions and element bytes as the kernel holds them) without
/// handles and kernel-assigned anonymous set numbers, sorted line by line (element order is hash order).
func kernelView(_ ns: TestNamespace, _ table: String) throws -> [String] {
    let text = try ns.nft("--debug=netlink", "list", "table", "inet", table)
    let netlinkPart = text.components(separatedBy: "\ntable inet ").first ?? text
    return netlinkPart.split(separator: "\n").map { line -> String in
        var l = String(line)
        // "inet t chain 12 11" → "inet t chain"
        if l.hasPrefix("inet ") {
            var words = l.split(separator: " ").map(String.init)
            while let last = words.last, UInt64(last) != nil { words.removeLast() }
            l = words.joined(separator: " ")
        }
        return l.replacingOccurrences(of: #"__map\d+"#, with: "__map", options: .regularExpression)
    }.filter { !$0.isEmpty }.sorted()
}

/// Every set of the table with its attributes and userdata (hex), as the kernel dumps them, sorted by name.
func setAttributes(_ ns: TestNamespace, _ table: String) throws -> [String] {
    let dumped = try #require(try ns.backend.dumpTable(family: .inet, name: table))
    return dumped.sets.map { s in
        "\(s.name) flags \(s.flags) key \(s.keyType)/\(s.keyLength) data \(s.dataType.map(String.init) ?? "-")/\(s.dataLength.map(String.init) ?? "-")"
            + " size \(s.size.map(String.init) ?? "-") udata \(hex(s.userdata))"
    }.sorted()
}

/// The NetlinkError `body` throws; records an issue when it succeeds or throws something else.
func netlinkError<T>(_ body: () throws -> T, sourceLocation: SourceLocation = #_sourceLocation) -> NetlinkError? {
    do {
        _ = try body()
        Issue.record("expected a NetlinkError, but the call succeeded", sourceLocation: sourceLocation)
    } catch let e as NetlinkError {
        return e
    } catch {
        Issue.record("expected a NetlinkError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

final class ErrorList: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    func add(_ s: String) { lock.lock(); list.append(s); lock.unlock() }
    var items: [String] { lock.lock(); defer { lock.unlock() }; return list }
}

extension NetlinkKernelTests {
    /// examples/policy.yaml: ranged maps (interval concatenations with key ends), affinity chains and dynamic
    /// sets with a timeout.
    static func policyPlan(settings: PlanSettings = PlanSettings(table: table)) throws -> RulePlan {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let bytes = try Array(Data(contentsOf: root.appendingPathComponent("examples/policy.yaml")))
        let objects = try DocumentLoader.load(bytes, source: "examples/policy.yaml")
        let options = ResolutionOptions(externalIPAllowlist: [CIDR("192.0.2.0/24")!])
        return try Planner(settings: settings).plan(ServiceResolver(options: options).resolve(objects), strategy: .auto)
    }

    @Test("source ranges and ClientIP affinity: netlink apply lists like nft -f, and both read back as planned")
    func policyParity() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        for masquerade in [true, false] {
            let plan = try Self.policyPlan(settings: PlanSettings(table: Self.table, masquerade: masquerade))
            #expect(plan.hasSourceRanges && plan.affinityChains.count == 2)
            try withNamespaces(2, label: "parity-policy") { ns in
                try ns[0].backend.apply(plan)
                try ns[1].nftScript(try NftRenderer.render(plan))
                let viaNetlink = try ns[0].nft("list", "table", "inet", Self.table)
                #expect(normalizeListing(viaNetlink) == normalizeListing(try ns[1].nft("list", "table", "inet", Self.table)))
                #expect(try kernelView(ns[0], Self.table) == kernelView(ns[1], Self.table))
                #expect(try setAttributes(ns[0], Self.table) == setAttributes(ns[1], Self.table))
                #expect(viaNetlink.contains("203.0.113.21 . tcp . 443 . 203.0.113.128/25 comment \"shop/reports:https\" : goto pick4-tcp-1"))
                #expect(viaNetlink.contains("timeout 10m"))
                let expected = NftablesNetlink.expected(plan)
                #expect(expected.mappings.contains { $0.sourceRanges.count == 2 && $0.affinityTimeout == 600 })
                for n in ns {
                    let installed = try n.backend.read(table: Self.table)
                    #expect(installed == expected, "\(installed.map { $0.differences(to: expected) } ?? ["no table"])")
                }
                // Applying again changes nothing.
                try ns[0].backend.apply(plan)
                #expect(try ns[0].backend.read(table: Self.table) == expected)
            }
        }
    }
}
