import Foundation
import NetAddress
@testable import NetlinkBackend
import RulePlanning
import ServiceResolution
import Testing

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

    @Test("the batch has nft's order: table, delete, table, chains, sets with elements, rules")
    func operationOrder() throws {
        let plan = try Fixtures.samplePlan()
        let d = try NftablesNetlink.describe(plan)
        #expect(Array(d.prefix(5)) == [
            "creating table inet hostnet-dnat if missing",
            "deleting table inet hostnet-dnat",
            "adding table inet hostnet-dnat",
            "adding chain output (type nat hook output priority -99)",
            "adding chain postrouting (type nat hook postrouting priority 100)",
        ])
        let firstSet = try #require(d.firstIndex { $0.hasPrefix("adding map dispatch4") })
        let lastChain = try #require(d.lastIndex { $0.hasPrefix("adding chain ") })
        let firstRule = try #require(d.firstIndex { $0.hasPrefix("adding rule") })
        #expect(lastChain < firstSet && firstSet < firstRule)
        #expect(d.contains("adding rule to chain output: ip daddr . meta l4proto . th dport vmap @dispatch4"))
        #expect(d.contains { $0.hasPrefix("adding 6 elements (203.0.113.10 . tcp . 80 : goto svc4-") && $0.hasSuffix(") to map dispatch4") })
        #expect(d.contains { $0.contains("dnat ip6 to numgen random mod 3 map { 0 : 2001:db8::5 . 8443, 1 : 2001:db8::6 . 8443, 2 : 2001:db8::7 . 8443 } comment \"default/web:https\"") })
        #expect(d.contains { $0.contains("meta l4proto udp dnat ip to 198.51.100.7:53 comment \"default/dns:dns\"") })
        // No masquerade: neither the chain nor the sets.
        let plain = try NftablesNetlink.describe(try Fixtures.samplePlan(masquerade: false))
        #expect(!plain.contains { $0.contains("masquerade") || $0.contains("postrouting") })
    }

    @Test("keys are padded to 4 bytes per field; map data is address . port; comments are NUL-terminated udata")
    func encodings() {
        #expect(RulesetProgram.dispatchKey(IPAddress("203.0.113.10")!, .tcp, 443) == [203, 0, 113, 10, 6, 0, 0, 0, 1, 187, 0, 0])
        #expect(RulesetProgram.dispatchKey(IPAddress("2001:db8::10")!, .udp, 53).count == 24)
        #expect(RulesetProgram.destinationData(Destination(ip: IPAddress("198.51.100.5")!, port: 8443)) == [198, 51, 100, 5, 0x20, 0xfb, 0, 0])
        #expect(Userdata.ruleComment("default/web:https") == [0, 18] + Array("default/web:https".utf8) + [0])
        #expect(NftRule(family: .inet, table: "t", chain: "c", expressions: [], userdata: Userdata.ruleComment("a/b:c")).comment == "a/b:c")
        // What nft 1.0.6 stores for `type ipv4_addr . inet_proto . inet_service : verdict` (host order = little endian here).
        if UInt32(1).littleEndian == 1 {
            #expect(Userdata.concatVerdictMap == [0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0])
            #expect(Userdata.addressSet == [0, 4, 2, 0, 0, 0])
            #expect(Userdata.numgenMap == [0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0])
        }
        #expect(Nft.concat([Nft.typeIPv4Addr, Nft.typeInetProto, Nft.typeInetService]) == 0x730d)
        #expect(Nft.concat([Nft.typeIPv6Addr, Nft.typeInetService]) == 0x20d)
    }

    @Test("large element lists are split over messages whose nested list stays far below 64 KiB")
    func elementChunking() throws {
        let plan = try Fixtures.largePlan(mappings: 4_000)
        let ops = try RulesetProgram.operations(plan)
        let batch = NetlinkBatch(ops)
        let enc = batch.encode(beginSequence: 100)
        var total = 0
        for (i, op) in ops.enumerated() {
            guard case .newElements(_, let elements) = op.kind else { continue }
            let r = enc.ranges[i]
            #expect(r.count < 60_000)
            let children = NetlinkParse.childRanges(ofMessageAt: r.lowerBound, length: r.count, in: enc.bytes, listType: 3)
            #expect(children.count == elements.count)
            #expect(op.elementDescriptions.count == elements.count)
            total += elements.count
        }
        // dispatch entries + masquerade addresses + numgen map entries
        #expect(total > 4_000)
        // Every message is framed correctly, with consecutive sequence numbers after BATCH_BEGIN.
        let headers = NetlinkParse.messages(in: enc.bytes)
        #expect(headers.count == ops.count + 2)
        #expect(headers.map(\.sequence) == (0..<UInt32(ops.count + 2)).map { 100 + $0 })
        #expect(headers.dropFirst().dropLast().allSatisfy { $0.flags & 0x4 != 0 })  // NLM_F_ACK on every operation
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
        var installed = expected
        installed.mappings.removeAll { $0.externalIP.description == "203.0.113.11" && $0.protocol == .udp }
        installed.mappings.append(InstalledMapping(externalIP: IPAddress("203.0.113.99")!, protocol: .tcp, port: 1, chain: "svc4-x",
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
