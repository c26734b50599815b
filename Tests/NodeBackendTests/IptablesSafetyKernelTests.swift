import Foundation
import NetAddress
@testable import NodeBackend
@testable import RulePlanning
import ServiceResolution
import Testing
import TestSupport

/// Failure modes of the per-family iptables restores, kube-proxy chains that are missing for some
/// services, and `--chain` names that belong to someone else. Namespaces only, documentation addresses.
extension NodeKernelTests {
    private func saves(_ node: TestNamespace, _ variant: IptablesVariant) throws -> [String] {
        try IPFamily.allCases.map { try NodeFixtures.save(node, variant, $0) }
    }

    /// A foreign IPv6 chain jumps to HOSTNET-DNAT-MASQ; re-applying with masquerade off would delete that
    /// chain. Refused before the IPv4 restore: neither family changes.
    @Test(arguments: IptablesVariant.allCases)
    func foreignJumpInIPv6RefusesApplyBeforeIPv4Changes(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-fref") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            _ = try applier.apply(try NodeFixtures.plan(), dryRun: false)
            try NodeFixtures.restore(node, variant, .ipv6, "*nat\n:FOO - [0:0]\n-A FOO -j HOSTNET-DNAT-MASQ\nCOMMIT\n")
            let before = try saves(node, variant)
            let off = try NodeFixtures.plan(settings: PlanSettings(masquerade: false))
            for dryRun in [true, false] {
                let e = #expect(throws: NodeError.self) { try applier.apply(off, dryRun: dryRun) }
                #expect(e?.exitCode == 1)
                #expect(e?.description.contains("-A FOO -j HOSTNET-DNAT-MASQ") == true, "\(e?.description ?? "")")
                #expect(e?.description.contains("IPv6") == true)
                #expect(e?.description.contains("nothing was changed") == true)
                #expect(try saves(node, variant) == before, "dryRun \(dryRun): a family changed")
            }
        }
    }

    /// `remove` with a foreign `FOO -j HOSTNET-DNAT` in ip6tables used to delete all IPv4 rules and then
    /// fail on IPv6; now it refuses first.
    @Test(arguments: IptablesVariant.allCases)
    func foreignJumpInIPv6RefusesRemoveBeforeIPv4Changes(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-frem") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try NodeFixtures.plan()
            _ = try applier.apply(plan, dryRun: false)
            try NodeFixtures.restore(node, variant, .ipv6, "*nat\n:FOO - [0:0]\n-A FOO -j HOSTNET-DNAT\nCOMMIT\n")
            let before = try saves(node, variant)
            let e = #expect(throws: NodeError.self) { try applier.remove(plan.settings) }
            #expect(e?.exitCode == 1)
            #expect(e?.description.contains("chain FOO: -A FOO -j HOSTNET-DNAT") == true, "\(e?.description ?? "")")
            #expect(try saves(node, variant) == before)
            // An IPv4-only plan would delete the IPv6 chains: refused the same way.
            let e4 = #expect(throws: NodeError.self) { try applier.apply(try NodeFixtures.plan(families: [.ipv4]), dryRun: false) }
            #expect(e4?.description.contains("-A FOO -j HOSTNET-DNAT") == true)
            #expect(try saves(node, variant) == before)
            // Once the foreign rule is gone, remove works.
            try NodeFixtures.restore(node, variant, .ipv6, "*nat\n-D FOO -j HOSTNET-DNAT\nCOMMIT\n")
            #expect(try applier.remove(plan.settings))
            for save in try saves(node, variant) { #expect(NodeFixtures.ourLines(save).isEmpty) }
        }
    }

    /// When the second family's restore fails anyway, the first family is put back from its saved state.
    @Test(arguments: IptablesVariant.allCases)
    func aFailedSecondRestoreRollsTheFirstFamilyBack(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-rollb") { node in
            let context = NodeFixtures.context(node)
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            _ = try NodeApplier(context: context, backend: .iptables, iptablesVariant: variant)
                .apply(try NodeFixtures.plan(), dryRun: false)
            // Same chains with the same rules in the same order (iptables-nft lists re-created chains last).
            func content() throws -> [String] { try IPFamily.allCases.map { try UpdateFixtures.natContent(node, variant, $0) } }
            let before = try content()
            let backend = IptablesBackend(context: context, variant: variant, variantReason: "test")
            let changed = try NodeFixtures.plan(settings: PlanSettings(masquerade: false), tcpPortName: "web")
            let changes = try backend.plannedChanges(changed)
            let v4 = changes[0], v6 = changes[1]
            #expect(!v4.differences.isEmpty)
            let e = #expect(throws: NodeError.self) {
                try backend.commit([(v4.owned, backend.applyScript(v4.desired, v4.owned, changed.settings)),
                                    (v6.owned, "*nat\n-A HNDNAT-DOES-NOT-EXIST -j RETURN\nCOMMIT\n")], changed.settings)
            }
            #expect(e?.description.contains("put back as they were") == true, "\(e?.description ?? "")")
            #expect(try content() == before, "IPv4 was not rolled back")
        }
    }

    /// An agent update whose IPv4 restore (the fast path, worked out from the two plans) went in and whose
    /// IPv6 restore then fails (a foreign rule jumps to a chain the update deletes): IPv4 is put back to the
    /// plan installed before, with its chains and rules, and then the full apply the update falls back to
    /// installs the new plan (it sees that chain as someone else's, and leaves it).
    @Test(arguments: IptablesVariant.allCases)
    func aFailedUpdateRollsTheFastPathFamilyBack(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-updrb") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let old = try NodeFixtures.plan()
            _ = try applier.apply(old, dryRun: false)
            // The renamed TCP port gets a new chain in each family; the old one is deleted. In IPv6 someone
            // else's rule still jumps to it, so the IPv6 restore's `-X` fails after IPv4's restore went in.
            let new = try NodeFixtures.plan(tcpPortName: "web")
            let v6Chain = try #require(old.targetChains.first { $0.family == .ipv6 && $0.portName == "http" }?.iptablesName)
            try NodeFixtures.restore(node, variant, .ipv6, "*nat\n:OTHER - [0:0]\n-A OTHER -j \(v6Chain)\nCOMMIT\n")
            let result = try applier.update(from: old, to: new)
            #expect(result.summary.contains("full apply instead of an update: the incremental restore failed"), "\(result.summary)")
            #expect(result.summary.contains("IPv4 rules had already been changed; they were put back as they were"), "\(result.summary)")
            #expect(!result.summary.contains("failed too"), "\(result.summary)")
            // And the full apply that followed left the new plan in both families.
            #expect(try applier.diff(new).isEmpty)
        }
    }

    /// kube-proxy has a chain for web:http but none for web:dns (no endpoints): the dns mapping is left
    /// out with a warning, the rest is applied; re-applying is a no-op.
    @Test(arguments: IptablesVariant.allCases)
    func kubeProxyTargetSkipsServicesWithoutAChain(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-kpskip") { node in
            let ruleset = NodeFixtures.kubeProxyRuleset().split(separator: "\n")
                .filter { !$0.contains(NodeFixtures.dnsServiceChain) && !$0.contains("KUBE-SEP-NODETESTDNS") }
                .joined(separator: "\n") + "\n"
            try NodeFixtures.restore(node, variant, .ipv4, ruleset)
            let kubeBefore = NodeFixtures.kubeLines(try NodeFixtures.save(node, variant))
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            // Dual-stack plan: the IPv6 chains do not exist either (kube-proxy is IPv4-only here).
            let plan = try NodeFixtures.plan(strategy: .kubeProxy)
            let result = try applier.apply(plan, dryRun: false)
            #expect(result.changed)
            #expect(result.warnings.contains { $0.contains(NodeFixtures.dnsServiceChain) && $0.contains("\(Net.external4) udp/53")
                && $0.contains("default/web:dns") && $0.contains("without endpoints") }, "\(result.warnings)")
            #expect(!result.warnings.contains { $0.contains(NodeFixtures.webServiceChain) && $0.contains(Net.external4) })
            #expect(result.summary.contains("WARNING"))
            let save = try NodeFixtures.save(node, variant)
            let ours = save.split(separator: "\n").filter { $0.hasPrefix("-A HOSTNET-DNAT ") }
            #expect(ours.count == 1 && ours[0].hasSuffix("-j \(NodeFixtures.webServiceChain)"), "\(ours)")
            #expect(save.contains("--ctorigdst \(Net.external4)"))
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant, .ipv6)).isEmpty)
            #expect(NodeFixtures.kubeLines(save) == kubeBefore)
            let again = try applier.apply(plan, dryRun: false)
            #expect(!again.changed, "\(again.differences)")
            #expect(again.warnings == result.warnings)
            #expect(try applier.diff(plan).isEmpty)
            #expect(try applier.remove(plan.settings))
        }
    }

    /// `--chain` naming an existing chain with someone else's rules (Docker's DNAT): refused with 64 for
    /// apply (dry run too) and remove, and the chain stays byte-identical.
    @Test(arguments: IptablesVariant.allCases)
    func aForeignMainChainIsNeverFlushed(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-fchain") { node in
            let docker = """
            *nat
            :DOCKER - [0:0]
            :MYNAT - [0:0]
            -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
            -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
            -A DOCKER -i docker0 -j RETURN
            -A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.0.2.2:80
            -A MYNAT -d 192.0.2.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.0.2.3:80
            COMMIT

            """
            try NodeFixtures.restore(node, variant, .ipv4, docker)
            let before = try saves(node, variant)
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            // Planner.validate refuses DOCKER itself; build such a plan anyway, as another caller could.
            let base = try NodeFixtures.plan()
            for name in ["DOCKER", "MYNAT"] {
                let settings = PlanSettings(chain: name)
                let plan = RulePlan(settings: settings, strategy: base.strategy, rules: base.rules, targetChains: base.targetChains,
                                    skipped: base.skipped, conflicts: base.conflicts, warnings: base.warnings)
                for dryRun in [true, false] {
                    let e = #expect(throws: NodeError.self) { try applier.apply(plan, dryRun: dryRun) }
                    #expect(e?.exitCode == 64)
                    #expect(e?.description.contains("--chain \(name)") == true && e?.description.contains("DNAT --to-destination") == true,
                            "\(e?.description ?? "")")
                }
                let r = #expect(throws: NodeError.self) { try applier.remove(settings) }
                #expect(r?.exitCode == 64)
                #expect(try saves(node, variant) == before, "\(name) changed")
            }
        }
    }
}

@Suite struct NodeApplierVariantTests {
    /// The variant auto detection found is the one written to; `--iptables` still wins over it.
    @Test func detectionResultIsUsedUnlessForced() throws {
        let detection = ProxyDetection(mode: .iptables(.legacy), evidence: ["chain KUBE-SERVICES in iptables-legacy nat table"],
                                       iptablesVariant: .legacy)
        let applier = NodeApplier(context: NodeContext(), backend: .iptables, iptablesVariant: nil, detection: detection)
        let (v, reason) = try applier.resolvedIptablesVariant()
        #expect(v == .legacy && reason.contains("KUBE-SERVICES"), "\(reason)")
        let forced = NodeApplier(context: NodeContext(), backend: .iptables, iptablesVariant: .nft, detection: detection)
        #expect(try forced.resolvedIptablesVariant().0 == .nft)
    }
}
