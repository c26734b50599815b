import Foundation
import Testing
import TestSupport

/// `hostnet-dnat apply/diff/status/remove` run as a user would, against a namespace the test creates.
@Suite(.serialized) struct ApplyCLIKernelTests {
    func cli(_ args: [String], stdin: String? = nil, prefix: [String] = []) throws -> CLI.Result {
        try CLI.run(args, stdin: stdin, prefix: prefix)
    }

    @Test(arguments: ["nftables", "iptables"])
    func applyCarriesRealTrafficAndRemoveStopsIt(backend: String) throws {
        guard try requireKernelTests(tools: ["nft", "iptables-restore", "python3"]) else { return }
        try withNodeAndPods { node, _ in
            let args = ["--netns", node.name, "--backend", backend]
            let applied = try cli(["apply", "-f", "-"] + args, stdin: trafficCluster)
            #expect(applied.status == 0, "\(applied.stderr)")
            #expect(applied.stderr.contains("target auto: picked endpoints"))
            let with = try reachable(from: node)
            #expect(with.count == 4, "\(backend): failed exchanges: \(with.filter { $0.key.hasSuffix("failed") })")
            for (key, servers) in with where !key.hasSuffix("failed") {
                #expect(servers == ["ep1", "ep2"], "\(backend) \(key) reached \(servers.sorted())")
            }
            let first = try node.runChecked(backend == "nftables" ? ["nft", "list", "ruleset"] : ["iptables-save", "-t", "nat"]).stdout
            // Apply twice = apply once.
            let again = try cli(["apply", "-f", "-"] + args, stdin: trafficCluster)
            #expect(again.status == 0)
            let second = try node.runChecked(backend == "nftables" ? ["nft", "list", "ruleset"] : ["iptables-save", "-t", "nat"]).stdout
            #expect(normalizeSave(second) == normalizeSave(first))
            #expect(try cli(["diff", "-f", "-"] + args, stdin: trafficCluster).status == 0)
            // A changed input differs (exit 1), and --dry-run shows it without touching anything.
            let changed = trafficCluster.replacingOccurrences(of: "\"198.51.100.12\"", with: "\"198.51.100.13\"")
            let diff = try cli(["diff", "-f", "-"] + args, stdin: changed)
            #expect(diff.status == 1)
            #expect(diff.stdout.contains("198.51.100.13"))
            let dry = try cli(["apply", "--dry-run", "-f", "-"] + args, stdin: changed)
            #expect(dry.status == 0 && dry.stdout.contains("198.51.100.13"))
            #expect(try cli(["diff", "-f", "-"] + args, stdin: trafficCluster).status == 0)
            // status --output json reads the kernel back.
            let status = try cli(["status", "--output", "json"] + args)
            #expect(status.status == 0)
            let json = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
            #expect(json?["installed"] as? Bool == true)
            #expect((json?["mappings"] as? [Any])?.count == 4)
            let removed = try cli(["remove"] + args)
            #expect(removed.status == 0)
            let after = try reachable(from: node, count: 2, timeout: 0.5)
            #expect(after.filter { !$0.key.hasSuffix("failed") }.values.allSatisfy { $0.isEmpty }, "still reachable after remove: \(after)")
            let statusAfter = try cli(["status", "--output", "json"] + args)
            let jsonAfter = try JSONSerialization.jsonObject(with: Data(statusAfter.stdout.utf8)) as? [String: Any]
            #expect(jsonAfter?["installed"] as? Bool == false)
        }
    }

    @Test func badInputAppliesNothingAndKeepsThePreviousRules() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        try withNamespace("badinput") { ns in
            #expect(try cli(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name]).status == 0)
            let before = try ns.ruleset()
            let broken = trafficCluster.replacingOccurrences(of: "\"198.51.100.12\"", with: "\"198.51.100.312\"")
            let r = try cli(["apply", "-f", "-", "--netns", ns.name], stdin: broken)
            #expect(r.status == 65)
            #expect(r.stderr.contains("EndpointSlice test/echo-4"))
            #expect(r.stderr.contains("endpoints[1].addresses[0]"))
            #expect(try ns.ruleset() == before)
            // A priority the kernel would refuse (nat chains need one above -200) is now a usage error before
            // the kernel (NetlinkKernelTests covers the kernel's own refusal); everything stays as it was.
            let refused = try cli(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name, "--priority=-300"])
            #expect(refused.status == 64, "\(refused.stderr)")
            #expect(refused.stderr.contains("--priority -300"))
            #expect(try ns.ruleset() == before)
        }
    }

    @Test func anotherToolsTableIsNeverReplacedOrRemoved() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        try withNamespace("foreign") { ns in
            try ns.nftScript("table inet firewalld {\n chain filter_INPUT {\n type filter hook input priority 10; policy accept;\n tcp dport 22 accept\n }\n}\n")
            let before = try ns.ruleset()
            for args in [["apply", "-f", "examples/cluster.yaml"], ["apply", "--dry-run", "-f", "examples/cluster.yaml"], ["remove"]] {
                let r = try cli(args + ["--netns", ns.name, "--table", "firewalld"])
                #expect(r.status == 64, "\(args): \(r.stderr)")
                #expect(r.stderr.contains("was not created by hostnet-dnat"))
                #expect(try ns.ruleset() == before)
            }
        }
    }

    @Test func kubeProxyTargetIsAUsageErrorForTheNftablesBackend() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        try withNamespace("kpnft") { ns in
            let r = try cli(["apply", "-f", "examples/cluster.yaml", "--target", "kube-proxy", "--netns", ns.name])
            #expect(r.status == 64)
            #expect(r.stderr.contains("--backend iptables"))
            #expect(try ns.ruleset().isEmpty)
        }
    }

    @Test func withoutCapNetAdminExits77AndSaysWhy() throws {
        guard try requireKernelTests(tools: ["setpriv", "nft"]) else { return }
        try withNamespace("nocap") { ns in
            let r = try cli(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name, "--target", "endpoints"],
                            prefix: ["setpriv", "--bounding-set", "-net_admin"])
            #expect(r.status == 77)
            #expect(r.stderr.contains("CAP_NET_ADMIN"))
            #expect(try ns.ruleset().isEmpty)
        }
    }

    @Test func unknownNamespaceIsAUsageError() throws {
        let r = try cli(["status", "--netns", "hnd-does-not-exist-\(getpid())"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("no such network namespace"))
    }
}

/// iptables-save output without its timestamps and packet counters.
func normalizeSave(_ text: String) -> [String] {
    text.split(separator: "\n").filter { !$0.hasPrefix("#") }.map { line in
        line.hasPrefix(":") ? String(line.split(separator: " ").prefix(2).joined(separator: " ")) : String(line)
    }
}
