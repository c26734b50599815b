import Foundation
import NetAddress
import NetlinkBackend
import NodeBackend
import RulePlanning
import ServiceResolution
import Testing
import TestSupport

extension NodeKernelTests {
    /// The scenario the `auto` target exists for: kube-proxy in iptables mode translates ClusterIP
    /// 198.18.0.10:80 in nat OUTPUT. DNAT "external IP → ClusterIP" can never work there (one DNAT per
    /// connection); `auto` must notice kube-proxy and pick a target that works, for either backend.
    @Test(arguments: IptablesVariant.allCases)
    func kubeProxyNodeNaiveClusterIPFailsAndAutoWorks(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools + ["nft"]), try Variants.available(variant) else { return }
        try withNodeAndPod("kp-\(variant.rawValue)") { node, _ in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            let kubeBefore = NodeFixtures.kubeLines(try NodeFixtures.save(node, variant))
            #expect(kubeBefore.contains { $0.hasPrefix(":\(NodeFixtures.webServiceChain)") })
            func kubeUnchanged(_ step: String) throws {
                let now = NodeFixtures.kubeLines(try NodeFixtures.save(node, variant))
                #expect(now == kubeBefore, "kube-proxy's rules changed after \(step)")
            }
            // Baseline: the ClusterIP itself works from the node (kube-proxy's rules are live).
            let direct = try answers(from: node, .tcp, Net.clusterIP4, Net.tcpPort, count: 8)
            #expect(direct.failures == 0 && direct.servers == ["ep-a", "ep-b"], "kube-proxy-style rules do not serve the ClusterIP")

            let context = NodeFixtures.context(node)

            // 1. The naive target: our rules DNAT the external IP to the ClusterIP, and connections time out.
            let naive = try NodeFixtures.plan(strategy: .clusterIP, families: [.ipv4])
            #expect(naive.targetChains.allSatisfy { if case .clusterIP = $0.target { true } else { false } })
            let iptables = NodeApplier(context: context, backend: .iptables, iptablesVariant: nil)
            _ = try iptables.apply(naive, dryRun: false)
            let failed = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 2, timeout: 1)
            #expect(failed.failures == 2, "external IP -> ClusterIP unexpectedly worked: \(failed.servers)")
            try kubeUnchanged("the naive apply")

            // 2. auto: detection sees kube-proxy's iptables chains in this variant.
            let detection = try ProxyDetection.detect(in: context)
            #expect(detection.mode == .iptables(variant), "\(detection.evidence)")
            #expect(detection.iptablesVariant == variant)
            #expect(detection.evidence.contains { $0.contains("KUBE-SERVICES") && $0.contains(variant.rawValue) })
            let (iptStrategy, iptReason) = detection.strategy(backend: .iptables, haveEndpointSlices: true)
            #expect(iptStrategy == .kubeProxy, "\(iptReason)")
            // The default variant is the one holding kube-proxy's chains.
            #expect(try iptables.resolvedIptablesVariant().0 == variant)

            let viaKubeProxy = try NodeFixtures.plan(strategy: iptStrategy, families: [.ipv4])
            let applied = try iptables.apply(viaKubeProxy, dryRun: false)
            #expect(applied.changed)
            let jumped = try NodeFixtures.save(node, variant)
            #expect(jumped.contains("-j \(NodeFixtures.webServiceChain)") && jumped.contains("-j \(NodeFixtures.dnsServiceChain)"))
            for (transport, port) in [(TestTransport.tcp, Net.tcpPort), (.udp, Net.udpPort)] {
                let ok = try answers(from: node, transport, Net.external4, port, count: 24)
                #expect(ok.failures == 0, "kube-proxy target did not answer over \(transport)")
                #expect(ok.servers == ["ep-a", "ep-b"], "\(transport)")
            }
            #expect(try iptables.diff(viaKubeProxy).isEmpty)
            try kubeUnchanged("apply (kube-proxy target)")
            #expect(try iptables.remove(viaKubeProxy.settings))
            try kubeUnchanged("remove")
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant)).isEmpty)
            #expect(try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 1, timeout: 1).failures == 1)

            // 3. The nftables backend cannot jump into iptables chains: auto picks the endpoints.
            let (nftStrategy, nftReason) = detection.strategy(backend: .nftables, haveEndpointSlices: true)
            #expect(nftStrategy == .endpoints, "\(nftReason)")
            let nftables = NodeApplier(context: context, backend: .nftables)
            let direct2 = try NodeFixtures.plan(strategy: nftStrategy, families: [.ipv4])
            #expect(try nftables.apply(direct2, dryRun: false).changed)
            let ok2 = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 24)
            #expect(ok2.failures == 0 && ok2.servers == ["ep-a", "ep-b"])
            try kubeUnchanged("apply (nftables backend)")
            #expect(try nftables.remove(direct2.settings))
            try kubeUnchanged("remove (nftables backend)")
            #expect(try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 1, timeout: 1).failures == 1)

            // The kube-proxy target is refused by the nftables backend with a pointer to iptables.
            let e = #expect(throws: NodeError.self) { try nftables.apply(viaKubeProxy, dryRun: false) }
            #expect(e?.description.contains("--backend iptables") == true)
        }
    }

    // MARK: detection

    @Test func detectsIPVSFromKubeIPVS0() throws {
        guard try requireKernelTests(tools: Self.iptablesTools) else { return }
        try withNamespace("det-ipvs") { node in
            // No `dummy` module in this kernel: a veth named kube-ipvs0 stands in (only the name matters).
            try node.ip("link", "add", "kube-ipvs0", "type", "veth", "peer", "name", "kipvs-peer")
            // IPVS mode also fills KUBE-SERVICES; kube-ipvs0 must win.
            try NodeFixtures.restore(node, .nft, .ipv4, "*nat\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n")
            let d = try ProxyDetection.detect(in: NodeFixtures.context(node))
            #expect(d.mode == .ipvs, "\(d.evidence)")
            #expect(d.evidence.contains { $0.contains("interface kube-ipvs0 exists") })
            #expect(d.strategy(backend: .nftables, haveEndpointSlices: true).0 == .clusterIP)
            #expect(d.strategy(backend: .iptables, haveEndpointSlices: false).0 == .clusterIP)
        }
    }

    @Test func detectsNftablesModeFromTableKubeProxy() throws {
        guard try requireKernelTests(tools: Self.iptablesTools + ["nft"]) else { return }
        try withNamespace("det-nft") { node in
            try node.nftScript("table ip kube-proxy {\n\tchain services {\n\t}\n}\n")
            let d = try ProxyDetection.detect(in: NodeFixtures.context(node))
            #expect(d.mode == .nftables, "\(d.evidence)")
            #expect(d.evidence.contains { $0.contains("table ip kube-proxy exists") })
            #expect(d.strategy(backend: .nftables, haveEndpointSlices: true).0 == .endpoints)
            #expect(d.strategy(backend: .iptables, haveEndpointSlices: true).0 == .endpoints)
        }
    }

    @Test func detectsNothingOnAnEmptyNode() throws {
        guard try requireKernelTests(tools: Self.iptablesTools) else { return }
        try withNamespace("det-none") { node in
            let d = try ProxyDetection.detect(in: NodeFixtures.context(node))
            #expect(d.mode == .unknown, "\(d.evidence)")
            #expect(d.iptablesVariant == nil)
            #expect(d.evidence.contains("no interface kube-ipvs0"))
            #expect(d.strategy(backend: .nftables, haveEndpointSlices: true).0 == .endpoints)
            let (s, reason) = d.strategy(backend: .iptables, haveEndpointSlices: false)
            #expect(s == .clusterIP && reason.contains("WARNING"))
            // Detection only reads: iptables-legacy did not even create a table.
            #expect(try node.runChecked(["iptables-legacy-save"]).stdout.isEmpty)
        }
    }

    @Test(arguments: IptablesVariant.allCases)
    func detectsIptablesModeInTheVariantThatHoldsIt(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("det-ipt") { node in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            let context = NodeFixtures.context(node)
            let d = try ProxyDetection.detect(in: context)
            #expect(d.mode == .iptables(variant), "\(d.evidence)")
            #expect(d.evidence.contains { $0.contains("KUBE-IPTABLES-HINT") })
            let (chosen, reason) = try IptablesVariant.detect(in: context)
            #expect(chosen == variant, "\(reason)")
            // The other variant's tools, asked explicitly, still work (`--iptables` forces).
            let other: IptablesVariant = variant == .nft ? .legacy : .nft
            let forced = NodeApplier(context: context, backend: .iptables, iptablesVariant: other)
            #expect(try forced.resolvedIptablesVariant().0 == other)
        }
    }

    // MARK: nftables backend through NodeApplier

    @Test func nftablesApplierDryRunDiffStatusRemove() throws {
        guard try requireKernelTests(tools: ["nft", "python3"]) else { return }
        try withNodeAndPod("nft-app") { node, _ in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .nftables)
            let plan = try NodeFixtures.plan()
            let dry = try applier.apply(plan, dryRun: true)
            #expect(dry.changed && !dry.differences.isEmpty)
            #expect(!(try node.ruleset()).contains("hostnet-dnat"), "dry-run created the table")
            #expect(try applier.diff(plan) == dry.differences)

            let first = try applier.apply(plan, dryRun: false)
            #expect(first.changed)
            let listing = try node.nft("list", "table", "inet", "hostnet-dnat")
            #expect(try !applier.apply(plan, dryRun: false).changed)
            #expect(try node.nft("list", "table", "inet", "hostnet-dnat") == listing)
            #expect(try applier.diff(plan).isEmpty)
            for host in [Net.external4, Net.external6] {
                for (transport, port) in [(TestTransport.tcp, Net.tcpPort), (.udp, Net.udpPort)] {
                    let r = try answers(from: node, transport, host, port, count: 24)
                    #expect(r.failures == 0 && r.servers == ["ep-a", "ep-b"], "\(host) \(transport)")
                }
            }
            let status = try applier.status(plan.settings)
            #expect(status.installed && status.mappings.count == plan.rules.count)
            #expect(status.hooks.contains { $0.contains("priority -99") })
            #expect(status.json.contains("\"backend\":\"nftables\""))

            let changed = try NodeFixtures.plan(endpoints4: [Net.endpoints4[1]])
            #expect(!(try applier.diff(changed)).isEmpty)
            #expect(try applier.remove(plan.settings))
            #expect(try applier.remove(plan.settings) == false)
            #expect(try !applier.status(plan.settings).installed)
            #expect(try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 1, timeout: 1).failures == 1)
        }
    }
}
