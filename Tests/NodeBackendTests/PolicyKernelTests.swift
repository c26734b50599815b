import Foundation
import KubeObjects
import NetAddress
import NetlinkBackend
import NodeBackend
import RulePlanning
import RuleRendering
import ServiceResolution
import Testing
import TestSupport

/// Restrictions kube-proxy enforces (issue 10): our DNAT must never open what kube-proxy keeps shut.
/// Both backends through `NodeApplier`; the rendered nft script loaded with `nft -f` behaves the same.
extension NodeKernelTests {
    /// A node address inside the ranges (the veth's own 192.0.2.1 is outside them).
    static let insideSource = "203.0.113.99"
    static let ranges = ["203.0.113.0/25"]

    static func policyPlan(ranges: [String] = [], ipMode: String? = nil, affinity: Int? = nil,
                           settings: PlanSettings = PlanSettings()) throws -> RulePlan {
        var objects = NodeFixtures.objects(families: [.ipv4])
        objects.services[0].loadBalancerSourceRanges = ranges
        objects.services[0].loadBalancerIngress = [LoadBalancerIngress(ip: NodeFixtures.ip(Net.external4), ipMode: ipMode)]
        if let affinity {
            objects.services[0].sessionAffinity = "ClientIP"
            objects.services[0].sessionAffinityTimeoutSeconds = affinity
        }
        let options = ResolutionOptions(target: .endpoints, includeProxyMode: ipMode == "Proxy")
        return try Planner(settings: settings).plan(ServiceResolver(options: options).resolve(objects), strategy: .endpoints)
    }

    /// kube-proxy's source-range firewall for `default/web:http` at the LB IP, as its iptables mode writes it:
    /// KUBE-SERVICES sends the LB IP to KUBE-FW-…, which lets only the ranges on to KUBE-EXT-… (masquerade
    /// mark, then the service chain); everything else falls through nat untranslated and is dropped by
    /// filter KUBE-PROXY-FIREWALL, which matches the LB IP as destination.
    static func kubeProxyFirewall() -> String {
        let svc = NodeFixtures.webServiceChain
        let fw = svc.replacingOccurrences(of: "KUBE-SVC-", with: "KUBE-FW-")
        let ext = svc.replacingOccurrences(of: "KUBE-SVC-", with: "KUBE-EXT-")
        let c = "default/web:http"
        var out = "*nat\n:\(fw) - [0:0]\n:\(ext) - [0:0]\n"
        out += "-A KUBE-SERVICES -d \(Net.external4)/32 -p tcp -m comment --comment \"\(c) loadbalancer IP\" -m tcp --dport \(Net.tcpPort) -j \(fw)\n"
        for r in ranges { out += "-A \(fw) -s \(r) -m comment --comment \"\(c) loadbalancer IP\" -j \(ext)\n" }
        out += "-A \(ext) -m comment --comment \"masquerade traffic for \(c) external destinations\" -j KUBE-MARK-MASQ\n"
        out += "-A \(ext) -j \(svc)\nCOMMIT\n"
        out += "*filter\n:KUBE-PROXY-FIREWALL - [0:0]\n"
        out += "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n"
        out += "-A KUBE-PROXY-FIREWALL -d \(Net.external4)/32 -p tcp -m comment --comment \"\(c) traffic not accepted by \(fw)\" -m tcp --dport \(Net.tcpPort) -j DROP\n"
        out += "COMMIT\n"
        return out
    }

    /// Outside the ranges: nothing answers. Inside: both endpoints answer.
    func expectRangesEnforced(_ node: TestNamespace, _ step: String) throws {
        let outside = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 2, timeout: 1)
        #expect(outside.failures == 2, "\(step): a source outside the ranges reached \(outside.servers)")
        let inside = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 24, source: Self.insideSource)
        #expect(inside.failures == 0 && inside.servers == ["ep-a", "ep-b"], "\(step): inside the ranges: \(inside)")
    }

    @Test(arguments: IptablesVariant.allCases)
    func sourceRangesKeepKubeProxysFirewallShut(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools + ["nft"]), try Variants.available(variant) else { return }
        try withNodeAndPod("fw-\(variant.rawValue)") { node, _ in
            try addAddresses(node, ["\(Self.insideSource)/32"])
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            try NodeFixtures.restore(node, variant, .ipv4, Self.kubeProxyFirewall())
            try expectRangesEnforced(node, "kube-proxy alone")

            let context = NodeFixtures.context(node)
            let iptables = NodeApplier(context: context, backend: .iptables, iptablesVariant: variant)
            // The bug this guards against: without the ranges our DNAT (after kube-proxy's nat, before its filter)
            // lets the outside source through. This shows the test can fail.
            let open = try Self.policyPlan()
            _ = try iptables.apply(open, dryRun: false)
            let bypass = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 4)
            #expect(bypass.failures == 0, "without ranges the DNAT should bypass the firewall (the scenario of issue 10)")
            #expect(try iptables.remove(open.settings))

            let plan = try Self.policyPlan(ranges: Self.ranges)
            #expect(plan.rules.map { $0.mapping.sourceRanges.map(\.description) } == [Self.ranges, Self.ranges])  // tcp and udp
            #expect(try iptables.apply(plan, dryRun: false).changed)
            try expectRangesEnforced(node, "iptables backend")
            #expect(try iptables.diff(plan).isEmpty)
            let status = try iptables.status(plan.settings)
            #expect(status.mappings.first { $0.port == Net.tcpPort }?.sourceRanges == Self.ranges)
            #expect(status.json.contains("\"sourceRanges\":[\"203.0.113.0/25\"]"))
            #expect(try iptables.remove(plan.settings))

            // nftables: the netlink backend, then the rendered script loaded with nft -f.
            let nftables = NodeApplier(context: context, backend: .nftables)
            #expect(try nftables.apply(plan, dryRun: false).changed)
            try expectRangesEnforced(node, "nftables backend")
            #expect(try nftables.diff(plan).isEmpty)
            let nftStatus = try nftables.status(plan.settings)
            #expect(nftStatus.mappings.first { $0.port == Net.tcpPort }?.sourceRanges == Self.ranges)
            #expect(nftStatus.text.contains("from 203.0.113.0/25"))
            #expect(!(try nftables.diff(open)).isEmpty)
            #expect(try nftables.remove(plan.settings))
            try node.nftScript(try NftRenderer.render(plan))
            try expectRangesEnforced(node, "nft -f")
            _ = try node.nft("delete", "table", "inet", plan.settings.table)
            try expectRangesEnforced(node, "after remove")
        }
    }

    /// `ipMode: Proxy` with `--include-proxy-mode`: kube-proxy leaves the address to the cloud load balancer,
    /// which enforces the ranges; our DNAT skips it, so it must enforce them itself.
    @Test func sourceRangesOnAProxyModeAddress() throws {
        guard try requireKernelTests(tools: Self.iptablesTools + ["nft"]), try Variants.available(.nft) else { return }
        try withNodeAndPod("fw-proxy") { node, _ in
            try addAddresses(node, ["\(Self.insideSource)/32"])
            let plan = try Self.policyPlan(ranges: Self.ranges, ipMode: "Proxy")
            #expect(plan.rules.count == 2 && plan.rules.allSatisfy { $0.mapping.sourceRanges.count == 1 })
            let iptables = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: .nft)
            _ = try iptables.apply(plan, dryRun: false)
            try expectRangesEnforced(node, "iptables backend")
            #expect(try iptables.remove(plan.settings))
            let nftables = NodeApplier(context: NodeFixtures.context(node), backend: .nftables)
            _ = try nftables.apply(plan, dryRun: false)
            try expectRangesEnforced(node, "nftables backend")
            #expect(try nftables.remove(plan.settings))
        }
    }

    /// ClientIP affinity with two endpoints: every connection from the node reaches the endpoint the first one
    /// picked while connections keep coming; after the timeout (2 s) passes without one, a new pick is made.
    @Test(arguments: ["iptables", "nftables", "nft -f"])
    func clientIPAffinityKeepsTheNodeOnOneEndpointUntilTheTimeout(backend: String) throws {
        guard try requireKernelTests(tools: Self.iptablesTools + ["nft"]), try Variants.available(.nft) else { return }
        try withNodeAndPod("aff-\(backend)") { node, _ in
            let iptables = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: .nft)
            let nftables = NodeApplier(context: NodeFixtures.context(node), backend: .nftables)
            func install(_ plan: RulePlan) throws {
                switch backend {
                case "iptables": _ = try iptables.apply(plan, dryRun: false)
                case "nftables": _ = try nftables.apply(plan, dryRun: false)
                default: try node.nftScript(try NftRenderer.render(plan))
                }
            }
            // Without affinity connections spread.
            try install(try Self.policyPlan())
            let spread = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 24)
            #expect(spread.failures == 0 && spread.servers == ["ep-a", "ep-b"])

            let plan = try Self.policyPlan(affinity: 2)
            #expect(plan.affinityChains.count == 2)  // the TCP and the UDP port
            try install(plan)
            if backend == "iptables" { #expect(try iptables.diff(plan).isEmpty, "recent matches read back differently") }
            if backend == "nftables" { #expect(try nftables.diff(plan).isEmpty) }
            var picked: Set<String> = []
            for round in 0..<12 {
                let burst = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: round == 0 ? 24 : 4)
                #expect(burst.failures == 0 && burst.servers.count == 1, "round \(round): \(burst)")
                picked.formUnion(burst.servers)
                if picked.count == 2 && round >= 2 { break }
                Thread.sleep(forTimeInterval: 2.6)
            }
            // Each round after a timeout picks at random: one endpoint every time has probability 2^-11.
            #expect(picked == ["ep-a", "ep-b"], "a new pick never happened after the timeout")
            if backend != "nft -f" {
                let status = try (backend == "iptables" ? iptables : nftables).status(plan.settings)
                #expect(status.mappings.allSatisfy { $0.affinityTimeout == 2 && $0.destinations.count == 2 }, "\(status.mappings)")
            }
        }
    }
}
