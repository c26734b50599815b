import Foundation
import Testing
import TestSupport

/// A tiny cluster whose endpoints live in the test's "pod" namespace: one dual-stack LoadBalancer service
/// with a TCP and a UDP port, two endpoints per family.
let trafficCluster = """
{"apiVersion": "v1", "kind": "List", "items": [
 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "test"},
  "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4", "IPv6"], "clusterIPs": ["203.0.113.200", "2001:db8:ffff::200"],
           "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 8080},
                     {"name": "udp", "protocol": "UDP", "port": 53, "targetPort": 5353}]},
  "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}, {"ip": "2001:db8:100::10"}]}}},
 {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
  "metadata": {"name": "echo-4", "namespace": "test", "labels": {"kubernetes.io/service-name": "echo"}},
  "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}, {"name": "udp", "port": 5353, "protocol": "UDP"}],
  "endpoints": [{"addresses": ["198.51.100.11"]}, {"addresses": ["198.51.100.12"]}]},
 {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
  "metadata": {"name": "echo-6", "namespace": "test", "labels": {"kubernetes.io/service-name": "echo"}},
  "addressType": "IPv6", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}, {"name": "udp", "port": 5353, "protocol": "UDP"}],
  "endpoints": [{"addresses": ["2001:db8:200::11"]}, {"addresses": ["2001:db8:200::12"]}]}
]}
"""

/// A "node" namespace joined to a "pod" namespace that serves the trafficCluster endpoints (TCP 8080, UDP 5353).
func withNodeAndPods<T>(_ body: (TestNamespace, TestNamespace) throws -> T) throws -> T {
    try withNamespaces(2, label: "render") { ns in
        let (node, pod) = (ns[0], ns[1])
        try connect(node, pod)
        try addAddresses(pod, ["198.51.100.11/32", "198.51.100.12/32", "2001:db8:200::11/128", "2001:db8:200::12/128"])
        var specs: [(namespace: TestNamespace, transport: TestTransport, address: String, port: Int, name: String)] = []
        for (address, name) in [("198.51.100.11", "ep1"), ("198.51.100.12", "ep2"), ("2001:db8:200::11", "ep1"), ("2001:db8:200::12", "ep2")] {
            specs.append((pod, .tcp, address, 8080, name))
            specs.append((pod, .udp, address, 5353, name))
        }
        return try withEchoServers(specs) { _ in try body(node, pod) }
    }
}

/// Sends `count` new connections per transport and family to the external IPs; returns the servers that
/// answered and, under `"<key> failed"`, one entry per failed exchange (so a test sees failures too).
/// 24 connections over two endpoints all landing on one happens with probability 2^-23.
func reachable(from node: TestNamespace, count: Int = 24, timeout: Double = 2) throws -> [String: Set<String>] {
    var seen: [String: Set<String>] = [:]
    for (host, label) in [("203.0.113.10", "v4"), ("2001:db8:100::10", "v6")] {
        for (transport, port) in [(TestTransport.tcp, 80), (.udp, 53)] {
            let replies = try exchange(from: node, transport, host: host, port: port, count: count, timeout: timeout)
            seen["\(label)/\(transport.rawValue)"] = Set(replies.compactMap(\.server))
            let failed = replies.enumerated().filter { !$0.element.succeeded }.map { "#\($0.offset): \($0.element)" }
            if !failed.isEmpty { seen["\(label)/\(transport.rawValue) failed"] = Set(failed) }
        }
    }
    return seen
}

/// Forgets the node namespace's connection tracking entries. Removing rules leaves the flows they translated
/// in conntrack, and a UDP client that happens to get an earlier source port back is still part of such a flow
/// (DNATed as before, by design). "Not after removal" is a claim about new flows.
func forgetFlows(_ node: TestNamespace) throws {
    for family in ["ipv4", "ipv6"] {
        let r = try node.run(["conntrack", "-F", "-f", family])
        #expect(r.status == 0, "conntrack -F -f \(family): \(r.stderr)")
    }
}

@Suite(.serialized) struct RenderedRulesKernelTests {
    func render(_ args: [String], stdin: String? = nil) throws -> String {
        let r = try CLI.run(["render"] + args, stdin: stdin)
        #expect(r.status == 0, "\(r.stderr)")
        return r.stdout
    }

    @Test func everyRenderedNftFileChecksAndLoadsIdempotently() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let dir = CLI.root.appendingPathComponent("examples/rendered")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".nft") }.sorted()
        #expect(files.count >= 2)
        for file in files {
            let script = try String(contentsOf: dir.appendingPathComponent(file), encoding: .utf8)
            try withNamespace("nftfile") { ns in
                try ns.runChecked(["nft", "-c", "-f", "-"], input: script)
                try ns.nftScript(script)
                let first = try ns.ruleset()
                try ns.nftScript(script)
                #expect(try ns.ruleset() == first, "\(file): loading twice changed the ruleset")
                #expect(first.contains("table inet hostnet-dnat"))
                #expect(first.contains("type nat hook output priority -99"))
            }
        }
    }

    @Test func everyRenderedIptablesFileTestsAndLoadsWithoutTouchingOtherChains() throws {
        guard try requireKernelTests(tools: ["iptables-restore", "ip6tables-restore", "iptables-save"]) else { return }
        let dir = CLI.root.appendingPathComponent("examples/rendered")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.contains(".rules.v") }.sorted()
        #expect(files.count >= 3)
        for file in files {
            let text = try String(contentsOf: dir.appendingPathComponent(file), encoding: .utf8)
            let v6 = file.hasSuffix(".v6")
            try withNamespace("iptfile") { ns in
                let restore = v6 ? "ip6tables-restore" : "iptables-restore"
                let save = v6 ? "ip6tables-save" : "iptables-save"
                // Someone else's chains (kube-proxy's) must survive untouched; the kube-proxy rendering jumps into them.
                var kube = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n"
                for chain in Set(text.split(whereSeparator: \.isWhitespace).filter { $0.hasPrefix("KUBE-SVC-") }).sorted() {
                    kube += ":\(chain) - [0:0]\n"
                }
                kube += "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n"
                try ns.runChecked([restore, "--noflush", "-w"], input: kube)
                let before = try ns.runChecked([save, "-t", "nat"]).stdout.split(separator: "\n").filter { $0.contains("KUBE-") && !$0.hasPrefix("#") && !$0.contains("HOSTNET-DNAT") }
                try ns.runChecked([restore, "--test", "--noflush", "-w"], input: text)
                try ns.runChecked([restore, "--noflush", "-w"], input: text)
                let after = try ns.runChecked([save, "-t", "nat"]).stdout
                let kubeAfter = after.split(separator: "\n").filter { $0.contains("KUBE-") && !$0.hasPrefix("#") && !$0.contains("HOSTNET-DNAT") }
                #expect(kubeAfter == before, "\(file): kube-proxy's chains changed")
                #expect(after.contains("-A OUTPUT -j HOSTNET-DNAT"))
                let ours = text.split(separator: "\n").filter { $0.hasPrefix("-A HOSTNET-DNAT ") }.count
                #expect(after.split(separator: "\n").filter { $0.hasPrefix("-A HOSTNET-DNAT ") }.count == ours)
            }
        }
    }

    /// Names that an API server would reject can still arrive in a file; none of them may change the rules.
    @Test func hostileNamesCannotInjectRules() throws {
        guard try requireKernelTests(tools: ["nft", "iptables-restore", "iptables-save"]) else { return }
        let evil = #"x\" ; -A OUTPUT -j ACCEPT\n}\ntable ip evil { chain c { type filter hook output priority 0; drop; } }\n#"#
        let doc = """
        {"kind": "List", "items": [
         {"kind": "Service", "metadata": {"name": "\(evil)", "namespace": "ns\\t\\u0007"},
          "spec": {"clusterIP": "198.18.0.1", "ports": [{"name": "p\\r\\n*nat", "port": 443}]},
          "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}}]}
        """
        let nft = try render(["-f", "-", "--format", "nft", "--target", "cluster-ip"], stdin: doc)
        let ipt = try render(["-f", "-", "--format", "iptables", "--target", "cluster-ip"], stdin: doc)
        #expect(nft.contains("203.0.113.5 . tcp . 443 comment"))
        try withNamespace("hostile") { ns in
            try ns.runChecked(["nft", "-c", "-f", "-"], input: nft)
            try ns.nftScript(nft)
            let listing = try ns.ruleset()
            // The text survives only inside the (sanitized) comment, never as a statement of its own.
            #expect(!listing.split(separator: "\n").contains { $0.trimmingCharacters(in: .whitespaces).hasPrefix("table ip evil") })
            #expect(!listing.contains("\""+"x\\\""))
            #expect(listing.components(separatedBy: "\n").filter { $0.hasPrefix("table ") }.count == 1)
            try ns.runChecked(["iptables-restore", "--test", "--noflush", "-w"], input: ipt)
            try ns.runChecked(["iptables-restore", "--noflush", "-w"], input: ipt)
            let saved = try ns.runChecked(["iptables-save", "-t", "nat"]).stdout
            #expect(saved.split(separator: "\n").filter { $0.hasPrefix("-A OUTPUT") } == ["-A OUTPUT -j HOSTNET-DNAT"])
        }
    }

    @Test func realTrafficThroughRenderedNftRulesAndNotAfterRemoval() throws {
        guard try requireKernelTests(tools: ["nft", "python3", "conntrack"]) else { return }
        let script = try render(["-f", "-", "--format", "nft"], stdin: trafficCluster)
        try withNodeAndPods { node, _ in
            let without = try reachable(from: node, count: 2, timeout: 0.5)
            #expect(without.filter { !$0.key.hasSuffix("failed") }.values.allSatisfy { $0.isEmpty }, "reachable before any rule: \(without)")
            try node.nftScript(script)
            let with = try reachable(from: node)
            #expect(with.count == 4, "failed exchanges: \(with.filter { $0.key.hasSuffix("failed") })")
            for (key, servers) in with where !key.hasSuffix("failed") {
                #expect(servers == ["ep1", "ep2"], "\(key) reached \(servers.sorted()) over 24 connections")
            }
            try node.nft("delete", "table", "inet", "hostnet-dnat")
            try forgetFlows(node)
            let after = try reachable(from: node, count: 2, timeout: 0.5)
            #expect(after.filter { !$0.key.hasSuffix("failed") }.values.allSatisfy { $0.isEmpty }, "still reachable after removal: \(after)")
        }
    }

    @Test func realTrafficThroughRenderedIptablesRulesAndNotAfterRemoval() throws {
        guard try requireKernelTests(tools: ["iptables-restore", "ip6tables-restore", "python3", "conntrack"]) else { return }
        let v4 = try render(["-f", "-", "--format", "iptables"], stdin: trafficCluster)
        let v6 = try render(["-f", "-", "--format", "ip6tables"], stdin: trafficCluster)
        try withNodeAndPods { node, _ in
            try node.runChecked(["iptables-restore", "--noflush", "-w"], input: v4)
            try node.runChecked(["ip6tables-restore", "--noflush", "-w"], input: v6)
            let with = try reachable(from: node)
            #expect(with.count == 4, "failed exchanges: \(with.filter { $0.key.hasSuffix("failed") })")
            for (key, servers) in with where !key.hasSuffix("failed") {
                #expect(servers == ["ep1", "ep2"], "\(key) reached \(servers.sorted()) over 24 connections")
            }
            for tool in ["iptables", "ip6tables"] {
                try node.runChecked([tool, "-t", "nat", "-D", "OUTPUT", "-j", "HOSTNET-DNAT"])
                try node.runChecked([tool, "-t", "nat", "-D", "POSTROUTING", "-j", "HOSTNET-DNAT-MASQ"])
            }
            try forgetFlows(node)
            let after = try reachable(from: node, count: 2, timeout: 0.5)
            #expect(after.filter { !$0.key.hasSuffix("failed") }.values.allSatisfy { $0.isEmpty }, "still reachable after removal: \(after)")
        }
    }
}
