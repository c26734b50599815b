import Foundation
import KubeObjects
import NetAddress
import NetlinkBackend
import NodeBackend
import RulePlanning
import ServiceResolution
import Testing
import TestSupport

/// Every test here builds its own network namespaces (deleted afterwards, even on failure) and never
/// touches the host's ruleset. Serialized: real traffic with timeouts on a shared 2-core machine.
@Suite(.serialized) struct NodeKernelTests {
    static let iptablesTools = ["iptables-nft-restore", "iptables-legacy-restore", "nsenter", "python3"]

    // MARK: iptables backend

    @Test(arguments: IptablesVariant.allCases)
    func iptablesApplyIsIdempotentReplacesStaleChainsAndRemovesOnlyOurs(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-idem") { node in
            // Someone else's chain and jump, which must survive everything.
            let foreign = "*nat\n:OTHER-CHAIN - [0:0]\n-A OTHER-CHAIN -d 192.0.2.99/32 -j RETURN\n-A OUTPUT -j OTHER-CHAIN\nCOMMIT\n"
            try NodeFixtures.restore(node, variant, .ipv4, foreign)
            let foreignBefore = try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0.contains("OTHER-CHAIN") }

            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try NodeFixtures.plan()
            let first = try applier.apply(plan, dryRun: false)
            #expect(first.changed)
            #expect(first.summary.contains(variant.displayName))
            let afterFirst4 = try NodeFixtures.save(node, variant, .ipv4)
            let afterFirst6 = try NodeFixtures.save(node, variant, .ipv6)
            let second = try applier.apply(plan, dryRun: false)
            #expect(!second.changed, "second apply changed: \(second.differences)")
            #expect(try NodeFixtures.save(node, variant, .ipv4) == afterFirst4)
            #expect(try NodeFixtures.save(node, variant, .ipv6) == afterFirst6)
            for save in [afterFirst4, afterFirst6] {
                let lines = save.split(separator: "\n")
                #expect(lines.filter { $0 == "-A OUTPUT -j HOSTNET-DNAT" }.count == 1)
                #expect(lines.filter { $0 == "-A POSTROUTING -j HOSTNET-DNAT-MASQ" }.count == 1)
                // Target chains for TCP and UDP, one per service port.
                #expect(lines.filter { $0.hasPrefix(":HNDNAT-") }.count == 2)
            }
            #expect(try applier.diff(plan).isEmpty)

            // A changed plan (the TCP port is renamed, so its target chain gets another name).
            let oldChains = Set(NodeFixtures.ourLines(afterFirst4).filter { $0.hasPrefix(":HNDNAT-") })
            let changed = try NodeFixtures.plan(tcpPortName: "web")
            let diff = try applier.diff(changed)
            #expect(!diff.isEmpty)
            #expect(diff.contains { $0.contains("remove chain HNDNAT-") })
            let third = try applier.apply(changed, dryRun: false)
            #expect(third.changed)
            let afterChange = try NodeFixtures.save(node, variant)
            let newChains = Set(NodeFixtures.ourLines(afterChange).filter { $0.hasPrefix(":HNDNAT-") })
            #expect(newChains.count == 2)
            #expect(oldChains.intersection(newChains).count == 1, "the UDP chain stays, the TCP chain is replaced")
            #expect(afterChange.split(separator: "\n").filter { $0 == "-A OUTPUT -j HOSTNET-DNAT" }.count == 1)
            #expect(try applier.diff(changed).isEmpty)

            // A duplicated jump (e.g. someone loaded the rendered file by hand) is repaired to exactly one.
            try NodeFixtures.restore(node, variant, .ipv4, "*nat\n-A OUTPUT -j HOSTNET-DNAT\nCOMMIT\n")
            #expect(try applier.diff(changed).contains { $0.contains("2 times") })
            #expect(try applier.apply(changed, dryRun: false).changed)
            #expect(try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0 == "-A OUTPUT -j HOSTNET-DNAT" }.count == 1)

            let status = try applier.status(changed.settings)
            #expect(status.installed)
            #expect(status.iptablesVariant == variant)
            #expect(status.mappings.count == changed.rules.count)
            #expect(status.mappings.contains { $0.externalIP == Net.external4 && $0.port == Net.tcpPort && $0.destinations.count == 2 })

            #expect(try applier.remove(changed.settings))
            for family in IPFamily.allCases {
                let save = try NodeFixtures.save(node, variant, family)
                #expect(NodeFixtures.ourLines(save).isEmpty, "left behind in \(family): \(NodeFixtures.ourLines(save))")
            }
            #expect(try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0.contains("OTHER-CHAIN") } == foreignBefore)
            #expect(try applier.remove(changed.settings) == false)
            #expect(try !applier.status(changed.settings).installed)
        }
    }

    /// A first install streams its restore (target chains declared and filled batch by batch while the rest
    /// are written, the dispatch chain last); an apply over an earlier plan compares and restores the changed
    /// chains. Both must leave the kernel holding the same chains and rules, in both families: the streamed
    /// namespace against one where another plan was applied first.
    @Test(arguments: IptablesVariant.allCases)
    func aStreamedFirstInstallHoldsWhatAComparedApplyWrites(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        let plan = try NodeFixtures.plan(strategy: .endpoints)
        try withNamespace("ipt-strm") { streamed in
            try withNamespace("ipt-cmpd") { compared in
                let first = try NodeApplier(context: NodeFixtures.context(streamed), backend: .iptables, iptablesVariant: variant)
                    .apply(plan, dryRun: false)
                // It streamed: the dispatch chain's rules come after every target chain's, unlike a compared apply.
                let input = first.restoreInputs.first ?? ""
                let lines = input.split(separator: "\n")
                let lastTarget = lines.lastIndex { $0.hasPrefix("-A HNDNAT-") } ?? lines.endIndex
                let firstDispatch = lines.firstIndex { $0.hasPrefix("-A HOSTNET-DNAT ") } ?? lines.startIndex
                #expect(first.restoreInputs.count == 2 && lastTarget < firstDispatch, "\(input)")
                #expect(first.changed && first.restoredChains > 0)

                let other = try NodeApplier(context: NodeFixtures.context(compared), backend: .iptables, iptablesVariant: variant)
                _ = try other.apply(try NodeFixtures.plan(strategy: .endpoints, tcpPortName: "web", endpoints4: [Net.endpoints4[0]]), dryRun: false)
                let second = try other.apply(plan, dryRun: false)
                #expect(second.changed && !second.restoreInputs.isEmpty)

                // Same chains with the same rules (iptables-nft lists chains in the order they were made).
                for family in IPFamily.allCases {
                    let got = try UpdateFixtures.natContent(streamed, variant, family)
                    #expect(got.contains(":HNDNAT-"), "\(family): \(got)")
                    #expect(got == (try UpdateFixtures.natContent(compared, variant, family)), "\(family)")
                }
                // And applying again to the streamed install finds nothing to do.
                #expect(try !NodeApplier(context: NodeFixtures.context(streamed), backend: .iptables, iptablesVariant: variant)
                    .apply(plan, dryRun: false).changed)
            }
        }
    }

    @Test(arguments: IptablesVariant.allCases)
    func iptablesTrafficReachesBothEndpointsOverTCPAndUDPForBothFamiliesAndStopsAfterRemove(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNodeAndPod("ipt-traffic") { node, _ in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try NodeFixtures.plan()
            // Before: nothing translates the external IPs.
            #expect(try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 1, timeout: 1).failures == 1)

            _ = try applier.apply(plan, dryRun: false)
            for host in [Net.external4, Net.external6] {
                for (transport, port) in [(TestTransport.tcp, Net.tcpPort), (.udp, Net.udpPort)] {
                    let r = try answers(from: node, transport, host, port, count: 24)
                    #expect(r.failures == 0, "\(variant) \(host) \(transport)")
                    #expect(r.servers == ["ep-a", "ep-b"], "\(variant) \(host) \(transport): spread over both endpoints")
                }
            }
            #expect(try applier.remove(plan.settings))
            for host in [Net.external4, Net.external6] {
                for (transport, port) in [(TestTransport.tcp, Net.tcpPort), (.udp, Net.udpPort)] {
                    let r = try answers(from: node, transport, host, port, count: 2, timeout: 1)
                    #expect(r.failures == 2, "\(variant) \(host) \(transport) still answered after remove")
                }
            }
        }
    }

    @Test(arguments: IptablesVariant.allCases)
    func dryRunTouchesNothingAndDiffTracksChanges(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-dry") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try NodeFixtures.plan()
            let before = try (IPFamily.allCases.map { try NodeFixtures.save(node, variant, $0) })
            let dry = try applier.apply(plan, dryRun: true)
            #expect(dry.changed && !dry.differences.isEmpty)
            #expect(dry.summary.contains("would change"))
            // Not even the nat table was created (iptables-legacy creates tables when they are named).
            #expect(try (IPFamily.allCases.map { try NodeFixtures.save(node, variant, $0) }) == before)
            #expect(try applier.diff(plan) == dry.differences)

            _ = try applier.apply(plan, dryRun: false)
            #expect(try applier.diff(plan).isEmpty)
            let applied = try NodeFixtures.save(node, variant)
            let changed = try NodeFixtures.plan(endpoints4: [Net.endpoints4[0]])
            let diff = try applier.diff(changed)
            #expect(!diff.isEmpty)
            #expect(try applier.apply(changed, dryRun: true).differences == diff)
            #expect(try NodeFixtures.save(node, variant) == applied, "dry-run changed the rules")
            #expect(try applier.remove(plan.settings))
        }
    }

    @Test(arguments: IptablesVariant.allCases)
    func priorityBelowMinus100InsertsBeforeKubeProxy(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-prio") { node in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let before = try NodeFixtures.plan(settings: PlanSettings(priority: -101), families: [.ipv4])
            _ = try applier.apply(before, dryRun: false)
            var output = try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0.hasPrefix("-A OUTPUT ") }
            #expect(output.first == "-A OUTPUT -j HOSTNET-DNAT")
            // Back to after kube-proxy: the jump moves, still exactly once.
            let after = try NodeFixtures.plan(families: [.ipv4])
            #expect(try applier.diff(after).contains { $0.contains("move jump") })
            _ = try applier.apply(after, dryRun: false)
            output = try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0.hasPrefix("-A OUTPUT ") }
            #expect(output.count == 2 && output.last == "-A OUTPUT -j HOSTNET-DNAT" && output.first!.contains("KUBE-SERVICES"))
        }
    }

    @Test(arguments: IptablesVariant.allCases)
    func kubeProxyTargetWithoutKubeProxyChainIsAClearError(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-nokp") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try NodeFixtures.plan(strategy: .kubeProxy, families: [.ipv4])
            let error = #expect(throws: NodeError.self) { try applier.apply(plan, dryRun: false) }
            #expect(error?.exitCode == 1)
            #expect(error?.description.contains(NodeFixtures.webServiceChain) == true, "\(error?.description ?? "")")
            #expect(error?.description.contains("does not exist") == true)
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant)).isEmpty)
        }
    }

    @Test func aMissingNamespaceIsNamedInTheError() throws {
        guard try requireKernelTests(tools: Self.iptablesTools) else { return }
        let nowhere = NodeContext(netns: NetworkNamespace(path: "/run/netns/hnd-does-not-exist-\(getpid())"))
        let e = #expect(throws: NodeError.self) {
            try NodeApplier(context: nowhere, backend: .iptables, iptablesVariant: .nft).status(PlanSettings())
        }
        #expect(e?.description.contains("hnd-does-not-exist") == true, "\(e?.description ?? "")")
        let d = #expect(throws: NodeError.self) { try ProxyDetection.detect(in: nowhere) }
        #expect(d?.description.contains("hnd-does-not-exist") == true, "\(d?.description ?? "")")
        let n = #expect(throws: NodeError.self) { try NodeApplier(context: nowhere, backend: .nftables).status(PlanSettings()) }
        #expect(n?.description.contains("hnd-does-not-exist") == true, "\(n?.description ?? "")")
    }
}

extension NodeKernelTests {
    @Test(arguments: IptablesVariant.allCases)
    func turningMasqueradeOffRemovesItsChainAndJump(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-masq") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            _ = try applier.apply(try NodeFixtures.plan(), dryRun: false)
            #expect(try NodeFixtures.save(node, variant).contains("-A POSTROUTING -j HOSTNET-DNAT-MASQ"))
            let off = try NodeFixtures.plan(settings: PlanSettings(masquerade: false))
            #expect(try applier.diff(off).contains { $0.contains("HOSTNET-DNAT-MASQ") })
            _ = try applier.apply(off, dryRun: false)
            for family in IPFamily.allCases {
                let save = try NodeFixtures.save(node, variant, family)
                #expect(!save.contains("HOSTNET-DNAT-MASQ"), "\(family)")
                #expect(save.contains("-A OUTPUT -j HOSTNET-DNAT"))
            }
            #expect(try applier.diff(off).isEmpty)
            // An IPv4-only plan takes our IPv6 chains out entirely.
            _ = try applier.apply(try NodeFixtures.plan(settings: PlanSettings(masquerade: false), families: [.ipv4]), dryRun: false)
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant, .ipv6)).isEmpty)
            #expect(!NodeFixtures.ourLines(try NodeFixtures.save(node, variant, .ipv4)).isEmpty)
            #expect(try applier.remove(off.settings))
        }
    }

    /// Two applies at once (different plans, from two threads): both finish, and the kernel then holds
    /// exactly one of the two plans, never a mix.
    @Test(arguments: IptablesVariant.allCases)
    func concurrentAppliesEndInOnePlan(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-race") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plans = [try NodeFixtures.plan(), try NodeFixtures.plan(tcpPortName: "web", endpoints4: [Net.endpoints4[0]])]
            for round in 0..<3 {
                final class Errors: @unchecked Sendable { var list: [String] = []; let lock = NSLock() }
                let errors = Errors()
                DispatchQueue.concurrentPerform(iterations: 2) { i in
                    do { _ = try applier.apply(plans[(i + round) % 2], dryRun: false) } catch {
                        errors.lock.lock(); errors.list.append("\(error)"); errors.lock.unlock()
                    }
                }
                #expect(errors.list.isEmpty, "\(errors.list)")
                let matches = try plans.filter { try applier.diff($0).isEmpty }.count
                #expect(matches == 1, "round \(round): the kernel holds \(matches) of the two plans")
                let save = try NodeFixtures.save(node, variant)
                #expect(save.split(separator: "\n").filter { $0 == "-A OUTPUT -j HOSTNET-DNAT" }.count == 1)
            }
            #expect(try applier.remove(plans[0].settings))
        }
    }
}

extension NodeKernelTests {
    /// Many mappings: one restore per family, apply twice = once, remove; prints timings. Size from
    /// HNDNAT_NODE_SCALE (default 2000 service ports, i.e. 2000 target chains and 4000 DNAT rules).
    @Test(arguments: IptablesVariant.allCases)
    func largePlanAppliesReappliesAndRemoves(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        let n = Int(ProcessInfo.processInfo.environment["HNDNAT_NODE_SCALE"] ?? "") ?? 2000
        let plan = try NodeFixtures.scalePlan(n)
        #expect(plan.rules.count == n)
        try withNamespace("ipt-scale") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            func timed<T>(_ body: () throws -> T) rethrows -> (T, Double) {
                let start = Date(); let r = try body(); return (r, Date().timeIntervalSince(start))
            }
            let (first, t1) = try timed { try applier.apply(plan, dryRun: false) }
            #expect(first.changed)
            let (second, t2) = try timed { try applier.apply(plan, dryRun: false) }
            #expect(!second.changed)
            let (diff, t3) = try timed { try applier.diff(plan) }
            #expect(diff.isEmpty)
            let (removed, t4) = try timed { try applier.remove(plan.settings) }
            #expect(removed)
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant)).isEmpty)
            func ms(_ t: Double) -> String { "\(Int((t * 1000).rounded())) ms" }
            print("iptables-\(variant.rawValue), \(n) mappings: apply \(ms(t1)), re-apply (no change) \(ms(t2)), diff \(ms(t3)), remove \(ms(t4))")
        }
    }
}
