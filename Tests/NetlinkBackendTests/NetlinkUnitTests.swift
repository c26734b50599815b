import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import ServiceResolution
import Testing

func hex(_ b: [UInt8]) -> String { b.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }

/// No kernel needed: plan → operations, encodings, error mapping, differences.
@Suite("netlink backend without a kernel")
struct NetlinkUnitTests {
    @Test("kube-proxy target plans are refused before anything is sent")
    func refusesKubeProxyTarget() throws {
        let plan = try Fixtures.plan(Fixtures.sample, strategy: .kubeProxy)
        #expect(plan.targetChains.contains { if case .kubeProxyChain = $0.target { return true }; return false })
        // A namespace that does not exist proves that no socket is opened.
        let backend = NftablesNetlink(namespace: NetworkNamespace(path: "/nonexistent/netns"))
        do {
            _ = try backend.apply(plan)
            Issue.record("kube-proxy plan accepted")
        } catch {
            #expect(error.kind == .unsupportedPlan)
            #expect(error.description.contains("--backend iptables"))
            #expect(error.description.contains("--format iptables"))
        }
    }

    @Test("the batch: table, delete, table, chains, maps and sets, rules, then the elements")
    func operationOrder() throws {
        let plan = try Fixtures.samplePlan()
        #expect(plan.nftPickChains.map(\.name) == ["pick4-tcp-1", "pick4-tcp-2", "pick4-udp-1", "pick6-tcp-1", "pick6-tcp-3"])
        let d = try NftablesNetlink.describe(plan)
        #expect(Array(d.prefix(10)) == [
            "creating table inet hostnet-dnat if missing",
            "deleting table inet hostnet-dnat",
            "adding table inet hostnet-dnat (comment \"managed by hostnet-dnat\")",
            "adding chain output (type nat hook output priority -99)",
            "adding chain postrouting (type nat hook postrouting priority 100)",
            "adding chain pick4-tcp-1",
            "adding chain pick4-tcp-2",
            "adding chain pick4-udp-1",
            "adding chain pick6-tcp-1",
            "adding chain pick6-tcp-3",
        ])
        let sets = d.filter { $0.hasPrefix("adding map ") || $0.hasPrefix("adding set ") }
        #expect(sets == [
            "adding map dispatch4 (type ipv4_addr . inet_proto . inet_service : verdict)",
            "adding map dispatch6 (type ipv6_addr . inet_proto . inet_service : verdict)",
            "adding map endpoints4 (typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport)",
            "adding map endpoints6 (typeof ip6 daddr . meta l4proto . th dport . numgen random mod 1 : ip6 daddr . th dport)",
            "adding set masquerade4 (type ipv4_addr)",
            "adding set masquerade6 (type ipv6_addr)",
        ])
        let firstSet = try #require(d.firstIndex { $0.hasPrefix("adding map dispatch4") })
        let lastChain = try #require(d.lastIndex { $0.hasPrefix("adding chain ") })
        let firstRule = try #require(d.firstIndex { $0.hasPrefix("adding rule") })
        #expect(lastChain < firstSet && firstSet < firstRule)
        #expect(d.contains("adding rule to chain output: ip daddr . meta l4proto . th dport vmap @dispatch4"))
        #expect(d.contains("adding 6 elements (203.0.113.10 . tcp . 80 comment \"default/web:http\" : goto pick4-tcp-2 … "
                           + "203.0.113.13 . tcp . 8000 comment \"prod/api:8000\" : goto pick4-tcp-2) to map dispatch4"), "\(d)")
        #expect(d.contains("adding 10 elements (203.0.113.10 . tcp . 80 . 0 : 198.51.100.5 . 8080 … "
                           + "203.0.113.13 . tcp . 8000 . 1 : 198.51.100.9 . 9000) to map endpoints4"), "\(d)")
        #expect(d.contains("adding rule to chain pick6-tcp-3: meta l4proto tcp dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints6"))
        // Elements come after the rules, so that binding the maps to rules walks empty maps.
        let lastRule = try #require(d.lastIndex { $0.hasPrefix("adding rule") })
        let firstElements = try #require(d.firstIndex { $0.hasPrefix("adding ") && $0.contains("element") })
        #expect(d[lastRule] == "adding rule to chain pick6-tcp-3: meta l4proto tcp dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints6")
        #expect(lastRule < firstElements)
        #expect(d[firstElements...].allSatisfy { $0.contains("element") })
        // No masquerade: neither the chain nor the sets.
        let plain = try NftablesNetlink.describe(try Fixtures.samplePlan(masquerade: false))
        #expect(!plain.contains { $0.contains("masquerade") || $0.contains("postrouting") })
        // An empty plan still has all four maps and both dispatch rules.
        let empty = try NftablesNetlink.describe(try Fixtures.plan([]))
        #expect(empty.filter { $0.hasPrefix("adding map ") }.count == 4)
        #expect(empty.filter { $0.hasPrefix("adding rule to chain output") }.count == 2)
        #expect(!empty.contains { $0.contains("elements") || $0.contains("pick") })
    }

    @Test("keys are padded to 4 bytes per field with a host-order slot; data is address . port; comments are NUL-terminated udata")
    func encodings() {
        #expect(RulesetProgram.dispatchKey(IPAddress("203.0.113.10")!, .tcp, 443) == [203, 0, 113, 10, 6, 0, 0, 0, 1, 187, 0, 0])
        #expect(RulesetProgram.dispatchKey(IPAddress("2001:db8::10")!, .udp, 53).count == 24)
        #expect(RulesetProgram.endpointKey(IPAddress("203.0.113.10")!, .tcp, 443, slot: 2)
                == [203, 0, 113, 10, 6, 0, 0, 0, 1, 187, 0, 0] + Nft.hostOrder(2))
        #expect(RulesetProgram.endpointKey(IPAddress("2001:db8::10")!, .sctp, 3868, slot: 0).count == 28)
        #expect(RulesetProgram.destinationData(Destination(ip: IPAddress("198.51.100.5")!, port: 8443)) == [198, 51, 100, 5, 0x20, 0xfb, 0, 0])
        #expect(Userdata.ruleComment("default/web:https") == [0, 18] + Array("default/web:https".utf8) + [0])
        #expect(Userdata.elementComment("a/b:c") == [0, 6] + Array("a/b:c".utf8) + [0])
        #expect(NftElement(key: [], userdata: Userdata.elementComment("a/b:c")).comment == "a/b:c")
        #expect(NftRule(family: .inet, table: "t", chain: "c", expressions: [], userdata: Userdata.ruleComment("a/b:c")).comment == "a/b:c")
        // What nft 1.0.6 stores (read back from sets that `nft -f` created; host order = little endian here).
        if UInt32(1).littleEndian == 1 {
            #expect(Userdata.concatVerdictMap == [0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0])
            #expect(Userdata.addressSet == [0, 4, 2, 0, 0, 0])
            #expect(hex(Userdata.endpointsMap(ipv6: false)) == Self.endpoints4Userdata)
            #expect(hex(Userdata.endpointsMap(ipv6: true)) == Self.endpoints6Userdata)
        }
        #expect(Nft.concat([Nft.typeIPv4Addr, Nft.typeInetProto, Nft.typeInetService]) == 0x730d)
        #expect(Nft.concat([Nft.typeIPv4Addr, Nft.typeInetProto, Nft.typeInetService, Nft.typeInteger]) == 0x1cc344)
        #expect(Nft.concat([Nft.typeIPv6Addr, Nft.typeInetService]) == 0x20d)
    }

    /// `typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport` as nft 1.0.6
    /// wrote it (dumped with NFT_MSG_GETSET from a table loaded with `nft -f`).
    static let endpoints4Userdata = "000400000000010400000000036000040d00000001580014000407000000010c00040c00000001040c000000010e00040900000001060004100000000214000407000000010c00040b000000010402000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000"
    static let endpoints6Userdata = "000400000000010400000000036000040d00000001580014000407000000010c00040d000000010409000000010e00040900000001060004100000000214000407000000010c00040b000000010402000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040b000000010402000000060400000000"

    @Test("large element lists are split over messages whose nested list stays below 64 KiB")
    func elementChunking() throws {
        let plan = try Fixtures.largePlan(mappings: 4_000, maxEndpoints: 10)
        let ops = try RulesetProgram.operations(plan)
        let batch = NetlinkBatch(ops)
        let enc = batch.encode(beginSequence: 100)
        var total = 0, messages = 0
        for (i, op) in ops.enumerated() {
            guard case .newElements(_, let elements) = op.kind else { continue }
            let r = enc.ranges[i]
            let children = NetlinkParse.childRanges(ofMessageAt: r.lowerBound, length: r.count, in: enc.bytes, listType: 3)
            #expect(children.count == elements.count)
            // The nested list's 16-bit length: the children plus the list header.
            let listBytes = (children.last?.upperBound ?? 0) - (children.first?.lowerBound ?? 0) + 4
            #expect(listBytes < 65_536)
            #expect(listBytes > RulesetProgram.elementListBudget - 200 || i == ops.count - 1
                    || { if case .newElements(let s, _) = ops[i + 1].kind { return s.name != (opSetName(op) ?? "") }; return true }())
            // wireSize counts exactly what libnftnl writes.
            #expect(zip(children, elements).allSatisfy { $0.count == RulesetProgram.wireSize($1) })
            total += elements.count
            messages += 1
        }
        // dispatch entries + endpoint slots + masquerade addresses
        let slots = plan.rules.reduce(0) { $0 + $1.mapping.target.destinations.count }
        #expect(total == plan.rules.count + slots + plan.externalAddresses(.ipv4).count + plan.externalAddresses(.ipv6).count)
        print("4000 mappings: \(total) elements in \(messages) element messages, \(enc.bytes.count) bytes")
        // Every message is framed correctly, with consecutive sequence numbers after BATCH_BEGIN.
        let headers = NetlinkParse.messages(in: enc.bytes)
        #expect(headers.count == ops.count + 2)
        #expect(headers.map(\.sequence) == (0..<UInt32(ops.count + 2)).map { 100 + $0 })
        #expect(headers.dropFirst().dropLast().allSatisfy { $0.flags & 0x4 != 0 })  // NLM_F_ACK on every operation
        // Element descriptions are made on demand, for any element of any message.
        let endpointsOp = try #require(ops.first { opSetName($0) == "endpoints6" })
        #expect(endpointsOp.elementDescription(0) == "adding element 2001:db8::4 . tcp . 1000 . 0 : 2001:db8:fffe::1 . 8000 to map endpoints6")
        #expect(endpointsOp.elementDescription(1) == "adding element 2001:db8::4 . tcp . 1000 . 1 : 2001:db8:fffe::2 . 8000 to map endpoints6")
    }

    private func opSetName(_ op: NftOperation) -> String? {
        if case .newElements(let s, _) = op.kind { return s.name }
        return nil
    }

    @Test("NLMSG_ERROR with extended ack TLVs is decoded")
    func ackParsing() {
        func le32(_ v: UInt32) -> [UInt8] { Nft.hostOrder(v) }
        func le16(_ v: UInt16) -> [UInt8] { Array(Nft.hostOrder(UInt32(v)).prefix(UInt32(1).littleEndian == 1 ? 2 : 4).suffix(2)) }
        let msg = Array("Priority is not supported".utf8) + [0]
        let msgAttr = le16(UInt16(4 + msg.count)) + le16(1) + msg + [UInt8](repeating: 0, count: NetlinkWire.align4(msg.count) - msg.count)
        let offAttr = le16(8) + le16(2) + le32(44)
        let inner = le32(100) + le16(0x0a03) + le16(0x405) + le32(77) + le32(0)  // echoed request header (capped)
        let payload = le32(UInt32(bitPattern: -95)) + inner + msgAttr + offAttr
        let header = le32(UInt32(16 + payload.count)) + le16(2) + le16(0x100 | 0x200) + le32(77) + le32(0)
        let bytes = header + payload
        let h = NetlinkParse.messages(in: bytes)
        #expect(h.count == 1)
        let ack = NetlinkParse.ack(h[0], in: bytes)
        #expect(ack?.sequence == 77)
        #expect(ack?.errno == 95)
        #expect(ack?.extMessage == "Priority is not supported")
        #expect(ack?.extOffset == 44)
    }

    @Test("errors are classified: permission (exit 77), modules unavailable, rejected")
    func errorKinds() {
        #expect(NetlinkError.kind(errno: 1, operation: nil) == .permissionDenied)
        #expect(NetlinkError.kind(errno: 13, operation: nil) == .permissionDenied)
        #expect(NetlinkError.kind(errno: 97, operation: nil) == .unavailable)
        #expect(NetlinkError.kind(errno: 93, operation: nil) == .unavailable)
        let natChain = NftOperation(kind: .newChain(NftChain(family: .inet, table: "t", name: "output",
                                                             base: NftBaseHook(type: "nat", hook: 3, priority: -99))),
                                    description: "adding chain output")
        let plainChain = NftOperation(kind: .newChain(NftChain(family: .inet, table: "t", name: "x", base: nil)), description: "adding chain x")
        #expect(NetlinkError.kind(errno: 2, operation: natChain) == .unavailable)
        #expect(NetlinkError.kind(errno: 2, operation: plainChain) == .rejected)
        #expect(NetlinkError.kind(errno: 95, operation: natChain) == .rejected)
        let e = NetlinkError(kind: .unavailable, operation: "adding chain output", errno: 2, message: "No such file or directory (ENOENT)")
        #expect(e.isUnavailable)
        #expect(e.description.hasPrefix("nf_tables or nat modules unavailable (nf_tables, nft_nat, nft_chain_nat, nf_conntrack)"))
        let p = NetlinkError(kind: .permissionDenied, operation: "starting the nftables transaction", errno: 1, message: "Operation not permitted (EPERM)")
        #expect(p.isPermissionDenied)
        #expect(p.description.contains("CAP_NET_ADMIN"))
    }

    @Test("expected(plan) and differences")
    func expectedAndDifferences() throws {
        let plan = try Fixtures.samplePlan()
        let expected = NftablesNetlink.expected(plan)
        #expect(expected.mappings.count == plan.rules.count)
        #expect(expected.outputPriority == -99)
        #expect(expected.masqueradePriority == 100)
        #expect(expected.anomalies.isEmpty)
        let web = try #require(expected.mappings.first { $0.externalIP.description == "2001:db8::10" && $0.port == 443 })
        #expect(web.chain == "pick6-tcp-3")
        #expect(web.comment == "default/web:https")
        #expect(web.destinations.map(\.description) == ["[2001:db8::5]:8443", "[2001:db8::6]:8443", "[2001:db8::7]:8443"])
        var installed = expected
        installed.mappings.removeAll { $0.externalIP.description == "203.0.113.11" && $0.protocol == .udp }
        installed.mappings.append(InstalledMapping(externalIP: IPAddress("203.0.113.99")!, protocol: .tcp, port: 1, chain: "pick4-tcp-1",
                                                   comment: "a/b:c", destinations: [Destination(ip: IPAddress("198.51.100.1")!, port: 2)]))
        installed.outputPriority = -100
        installed.anomalies = ["chain stray is not used by any dispatch entry"]
        #expect(installed.differences(to: expected) == [
            "- output chain priority -100",
            "+ output chain priority -99",
            "+ 203.0.113.11 udp/53 -> 198.51.100.7:53 (default/dns:dns)",
            "- 203.0.113.99 tcp/1 -> 198.51.100.1:2 (a/b:c)",
            "- chain stray is not used by any dispatch entry",
        ])
        #expect(expected.differences(to: expected).isEmpty)
    }

    /// What the kernel would hold after the batch, without a kernel: the operations' objects as a dump.
    static func simulatedDump(_ plan: RulePlan) throws -> DumpedTable {
        var d = DumpedTable(table: NftTable(family: .inet, name: plan.settings.table), chains: [], sets: [], elements: [:], rules: [])
        for op in try RulesetProgram.operations(plan) {
            switch op.kind {
            case .newTable(let t): d.table = t
            case .newChain(let c): d.chains.append(c)
            case .newSet(var s):
                s.id = nil
                if s.dataType == Nft.dataVerdict { s.dataLength = 16 }
                d.sets.append(s)
            case .newElements(let s, let e): d.elements[s.name, default: []] += e
            case .newRule(let r): d.rules.append(r)
            default: break
            }
        }
        return d
    }

    @Test("read-back decoding: mappings from dispatch elements, comments and endpoint slots; anomalies for what does not fit")
    func decoding() throws {
        let plan = try Fixtures.samplePlan()
        let expected = NftablesNetlink.expected(plan)
        let clean = try Self.simulatedDump(plan)
        #expect(RulesetDecoder.decode(clean) == expected)

        func decoded(_ change: (inout DumpedTable) -> Void) -> [String] {
            var d = clean
            change(&d)
            return RulesetDecoder.decode(d).differences(to: expected)
        }
        func slotKey(_ ip: String, _ p: TransportProtocol, _ port: Int, _ slot: Int) -> [UInt8] {
            RulesetProgram.endpointKey(IPAddress(ip)!, p, port, slot: slot)
        }

        // A dispatch entry whose slot 1 is missing: no destinations, and an anomaly that names the slot.
        #expect(decoded { d in d.elements["endpoints4"]!.removeAll { $0.key == slotKey("203.0.113.10", .tcp, 443, 1) } } == [
            "- 203.0.113.10 tcp/443 -> ? (default/web:https)",
            "+ 203.0.113.10 tcp/443 -> 198.51.100.5:8443, 198.51.100.6:8443 (default/web:https)",
            "- map endpoints4: element 203.0.113.10 . tcp . 443 (numgen mod 2 in chain pick4-tcp-2) has no slot 1",
        ])
        // An extra slot is never picked.
        #expect(decoded { d in
            d.elements["endpoints4"]!.append(NftElement(key: slotKey("203.0.113.11", .udp, 53, 1),
                                                        data: RulesetProgram.destinationData(Destination(ip: IPAddress("198.51.100.99")!, port: 53))))
        } == ["- map endpoints4: slot(s) 1 of 203.0.113.11 . udp . 53 are never picked (numgen mod 1 in chain pick4-udp-1)"])
        // A pick chain whose modulus does not match its name (and so the number of slots).
        let changed = decoded { d in
            let i = d.rules.firstIndex { $0.chain == "pick6-tcp-3" }!
            d.rules[i].expressions = RulesetProgram.pickRule(family: .ipv6, protocol: .tcp, count: 2)
        }
        #expect(changed.contains("- chain pick6-tcp-3 picks among 2 ip6 tcp endpoints (its name should be pick6-tcp-2)"))
        #expect(changed.contains("- 2001:db8::10 tcp/443 -> [2001:db8::5]:8443, [2001:db8::6]:8443 (default/web:https)"))
        #expect(changed.contains("- map endpoints6: slot(s) 2 of 2001:db8::10 . tcp . 443 are never picked (numgen mod 2 in chain pick6-tcp-3)"))
        // A comment that differs, a stray chain, a stray rule, orphaned endpoints, an unknown set.
        #expect(decoded { d in
            let i = d.elements["dispatch4"]!.firstIndex { $0.key == RulesetProgram.dispatchKey(IPAddress("203.0.113.11")!, .udp, 53) }!
            d.elements["dispatch4"]![i].userdata = Userdata.elementComment("other/dns:dns")
        } == ["+ 203.0.113.11 udp/53 -> 198.51.100.7:53 (default/dns:dns)", "- 203.0.113.11 udp/53 -> 198.51.100.7:53 (other/dns:dns)"])
        let stray = decoded { d in
            d.chains.append(NftChain(family: .inet, table: d.table.name, name: "stray", base: nil))
            d.rules.append(NftRule(family: .inet, table: d.table.name, chain: "pick4-udp-1", expressions: [.masq], userdata: nil))
            d.elements["dispatch4"]!.removeAll { $0.key == RulesetProgram.dispatchKey(IPAddress("203.0.113.12")!, .tcp, 8000) }
            d.sets.append(NftSet(family: .inet, table: d.table.name, name: "extra", id: nil, flags: 0, keyType: 7, keyLength: 4,
                                 dataType: nil, dataLength: nil, size: nil, userdata: []))
        }
        #expect(Set(stray) == [
            "+ 203.0.113.12 tcp/8000 -> 198.51.100.8:9000, 198.51.100.9:9000 (prod/api:8000)",
            "+ 203.0.113.11 udp/53 -> 198.51.100.7:53 (default/dns:dns)",
            "- 203.0.113.11 udp/53 -> ? (default/dns:dns)",
            "- chain pick4-udp-1: 2 rules instead of one pick rule",
            "- chain stray is not used by any dispatch entry",
            "- chain stray: 0 rules instead of one pick rule",
            "- map endpoints4: elements for 203.0.113.12 . tcp . 8000 have no dispatch entry",
            "- unexpected set extra",
        ], "\(stray)")
        #expect(stray.count == 8)
        // A dispatch entry that jumps to a pick chain of the other protocol, and one to a missing chain.
        let wrong = decoded { d in
            let i = d.elements["dispatch4"]!.firstIndex { $0.key == RulesetProgram.dispatchKey(IPAddress("203.0.113.11")!, .udp, 53) }!
            d.elements["dispatch4"]![i].verdict = NftVerdict(code: Nft.verdictGoto, chain: "pick4-tcp-1")
            let j = d.elements["dispatch4"]!.firstIndex { $0.key == RulesetProgram.dispatchKey(IPAddress("203.0.113.11")!, .tcp, 53) }!
            d.elements["dispatch4"]![j].verdict = NftVerdict(code: Nft.verdictGoto, chain: "pick4-tcp-9")
        }
        #expect(wrong.contains("- map dispatch4: element 203.0.113.11 . udp . 53 jumps to chain pick4-tcp-1, which translates ip tcp"))
        #expect(wrong.contains("- map dispatch4: element 203.0.113.11 . tcp . 53 jumps to missing chain pick4-tcp-9"))
        #expect(wrong.contains("- chain pick4-udp-1 is not used by any dispatch entry"))
    }

    @Test("read-back decoding of source ranges and affinity chains; anomalies when they are tampered with")
    func decodingPolicy() throws {
        let plan = try Fixtures.plan([ServiceSpec(name: "admin", ips: ["203.0.113.20", "2001:db8:100::20"], ports: [("http", .tcp, 80, 8080)],
                                                  endpoints4: ["198.51.100.21", "198.51.100.22"], endpoints6: ["2001:db8:200::21"])],
                                     settings: PlanSettings(), ranges: ["203.0.113.0/25", "198.51.100.7/24", "2001:db8:1::/48"], affinity: 600)
        let expected = NftablesNetlink.expected(plan)
        #expect(expected.mappings.map(\.description) == [
            "203.0.113.20 tcp/80 -> 198.51.100.21:8080, 198.51.100.22:8080 from 198.51.100.0/24, 203.0.113.0/25 affinity ClientIP 600s (default/admin:http)",
            "2001:db8:100::20 tcp/80 -> [2001:db8:200::21]:8080 from 2001:db8:1::/48 affinity ClientIP 600s (default/admin:http)",
        ])
        let clean = try Self.simulatedDump(plan)
        #expect(clean.elements["ranged4"]?.count == 2 && clean.elements["ranged4"]!.allSatisfy { $0.keyEnd?.count == 16 })
        #expect(RulesetDecoder.decode(clean) == expected)
        func decoded(_ change: (inout DumpedTable) -> Void) -> [String] {
            var d = clean
            change(&d)
            return RulesetDecoder.decode(d).differences(to: expected)
        }
        // A block dropped from ranged4 shows as a mapping with fewer ranges.
        #expect(decoded { d in d.elements["ranged4"]!.removeLast() }.contains {
            $0.hasPrefix("- 203.0.113.20 tcp/80 -> 198.51.100.21:8080, 198.51.100.22:8080 from ") && !$0.contains(", 203.0.113.0/25")
                || $0.hasPrefix("- 203.0.113.20 tcp/80") && !$0.contains("198.51.100.0/24,") })
        // An interval that is not one CIDR block.
        let odd = decoded { d in
            d.elements["ranged4"]![0].keyEnd = RulesetProgram.rangedKey(IPAddress("203.0.113.20")!, .tcp, 80, source: IPAddress("198.51.100.2")!)
        }
        #expect(odd.contains("- map ranged4: undecodable element (not one address . protocol . port . CIDR block)"))
        // An affinity set with another timeout, and an affinity chain missing its pick rules.
        let chain = plan.affinityChains.first { $0.family == .ipv4 }!
        let setName = chain.affinityName(chain.target.destinations[0])
        let retimed = decoded { d in d.sets[d.sets.firstIndex { $0.name == setName }!].timeout = 5000 }
        #expect(retimed.contains("- chain \(chain.iptablesName): affinity sets with different or fractional timeouts"), "\(retimed)")
        let cut = decoded { d in d.rules.removeAll { $0.chain == chain.iptablesName && $0.expressions.contains { if case .numgen = $0 { true } else { false } } } }
        #expect(cut.contains { $0.hasPrefix("- chain \(chain.iptablesName): ") })
        // The ranged rule is checked like the dispatch rules.
        #expect(decoded { d in d.rules.removeAll { $0.chain == "output" && $0.expressions.contains { if case .byteorder = $0 { true } else { false } } } }
            .contains("- chain output: missing dispatch rule 3"))
    }

    @Test("ownership: both NEWTABLEs carry the comment, with nft's bytes; a table without it is an anomaly")
    func ownershipComment() throws {
        // The renderer prints the same comment (RuleRendering is not a dependency of the backend).
        #expect(NftablesNetlink.ownershipComment == "managed by hostnet-dnat")
        // nft 1.0.6, `table inet t { comment "managed by hostnet-dnat" }`: NFTA_TABLE_USERDATA is
        // NFTNL_UDATA_TABLE_COMMENT (0), length 24, the text and its NUL.
        #expect(hex(Userdata.tableComment(NftablesNetlink.ownershipComment))
                == "0018" + hex(Array("managed by hostnet-dnat".utf8)) + "00")
        let plan = try Fixtures.samplePlan()
        let tables = try RulesetProgram.operations(plan).compactMap { op -> NftTable? in
            switch op.kind {
            case .newTable(let t), .deleteTable(let t): return t
            default: return nil
            }
        }
        #expect(tables.map(\.comment) == ["managed by hostnet-dnat", "managed by hostnet-dnat", "managed by hostnet-dnat"])

        let expected = NftablesNetlink.expected(plan)
        var unmarked = try Self.simulatedDump(plan)
        unmarked.table.userdata = nil
        #expect(RulesetDecoder.decode(unmarked).differences(to: expected)
                == ["- table inet hostnet-dnat was not created by hostnet-dnat (no comment \"managed by hostnet-dnat\")"])
        var other = unmarked
        other.table.userdata = Userdata.tableComment("firewalld")
        #expect(RulesetDecoder.decode(other).anomalies
                == ["table inet hostnet-dnat was not created by hostnet-dnat (no comment \"managed by hostnet-dnat\"; its comment is \"firewalld\")"])

        let refusal = NetlinkError(kind: .foreignTable, operation: "looking up table inet firewalld", errno: 0, message: "table inet firewalld exists …")
        #expect(refusal.description == "table inet firewalld exists …")
    }

    @Test("NetworkNamespace names and paths")
    func namespaces() throws {
        #expect(try NetworkNamespace(name: "blue").path == "/run/netns/blue")
        #expect(NetworkNamespace.process(1).path == "/proc/1/ns/net")
        #expect(try NetworkNamespace.parse("/proc/self/ns/net").path == "/proc/self/ns/net")
        #expect(throws: NetlinkError.self) { try NetworkNamespace(name: "../etc") }
        // Entering a namespace that does not exist fails cleanly, on the helper thread.
        #expect(throws: NetlinkError.self) { try NetworkNamespace(path: "/nonexistent/netns").run { 1 } }
        // Running in our own namespace works and returns the value.
        #expect(try NetworkNamespace(path: "/proc/self/ns/net").run { 42 } == 42)
    }
}
