import Foundation
import KubeObjects
import NetAddress
@testable import NodeBackend
import RulePlanning
import ServiceResolution
import Testing
import TestSupport

/// A second LoadBalancer service, `default/api` (IPv4 only, TCP 80 on 203.0.113.20 -> 198.51.100.6:8080),
/// for updates that add or remove a whole service.
enum UpdateFixtures {
    static let apiExternal = "203.0.113.20"
    static let apiClusterIP = "198.18.0.11"

    static func plan(strategy: TargetStrategy = .endpoints, families: [IPFamily] = [.ipv4, .ipv6], endpoints4: [String] = Net.endpoints4,
                     web: Bool = true, api: Bool = false) throws -> RulePlan {
        var objects = web ? NodeFixtures.objects(families: families, endpoints4: endpoints4) : ClusterObjects()
        if api {
            objects.services.append(Service(
                id: ObjectName(namespace: "default", name: "api"), type: "LoadBalancer",
                clusterIPs: [NodeFixtures.ip(apiClusterIP)], ipFamilies: [.ipv4],
                ports: [ServicePort(name: "http", protocol: .tcp, port: Net.tcpPort, targetPort: String(Net.tcpTarget))],
                loadBalancerIngress: [LoadBalancerIngress(ip: NodeFixtures.ip(apiExternal))]))
            objects.endpointSlices.append(EndpointSlice(
                id: ObjectName(namespace: "default", name: "api-1"), serviceName: "api", addressType: "IPv4",
                ports: [EndpointPort(name: "http", port: Net.tcpTarget, protocol: .tcp)],
                endpoints: [Endpoint(addresses: [NodeFixtures.ip(Net.endpoints4[1])])]))
        }
        let resolution = ServiceResolver(options: ResolutionOptions(target: strategy)).resolve(objects)
        return try Planner().plan(resolution, strategy: strategy)
    }

    static var apiServiceChain: String {
        KubeProxyNames.serviceChain(namespace: "default", name: "api", portName: "http", protocol: "TCP")
    }

    /// Our chain for one service's port in one family.
    static func chain(_ plan: RulePlan, _ service: String, _ family: IPFamily, _ proto: TransportProtocol) -> String {
        plan.targetChains.first { $0.service.name == service && $0.family == family && $0.protocol == proto }!.iptablesName
    }

    /// The chains a restore input declares (`:NAME`) and deletes (`-X NAME`).
    static func declared(_ input: String) -> Set<String> {
        Set(input.split(separator: "\n").filter { $0.hasPrefix(":") }.map { String($0.dropFirst().split(separator: " ")[0]) })
    }

    static func deleted(_ input: String) -> Set<String> {
        Set(input.split(separator: "\n").filter { $0.hasPrefix("-X ") }.map { String($0.dropFirst(3)) })
    }

    /// A namespace's nat table for comparing two namespaces: chain declarations sorted (iptables-nft lists
    /// re-created chains last), counters zeroed, each chain's rules in order.
    static func natContent(_ ns: TestNamespace, _ variant: IptablesVariant, _ family: IPFamily) throws -> String {
        let nat = SavedRuleset.parse(try NodeFixtures.save(ns, variant, family)).table("nat")
        return (nat?.chainOrder.sorted() ?? []).map { c in
            ":\(c)\n" + (nat?.rules(c).map { "-A \(c) \($0.text)\n" } ?? []).joined()
        }.joined()
    }
}

extension NodeKernelTests {
    /// Endpoint removed, added back, service added, removed, no change: after each update the namespace
    /// holds what a fresh apply of the new plan gives in another namespace, the restore declared exactly the
    /// chains that changed, and connections follow the change.
    @Test(arguments: IptablesVariant.allCases)
    func updateRestoresOnlyChangedChainsAndEndsWhereAFreshApplyDoes(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNodeAndPod("ipt-upd") { node, _ in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let full = try UpdateFixtures.plan()
            let oneEndpoint = try UpdateFixtures.plan(endpoints4: [Net.endpoints4[1]])
            let withAPI = try UpdateFixtures.plan(api: true)
            let web4 = [UpdateFixtures.chain(full, "web", .ipv4, .tcp), UpdateFixtures.chain(full, "web", .ipv4, .udp)]
            let api4 = UpdateFixtures.chain(withAPI, "api", .ipv4, .tcp)
            let s = full.settings
            _ = try applier.apply(full, dryRun: false)

            struct Step { var name: String; var old: RulePlan; var new: RulePlan; var declared: [Set<String>]; var deleted: Set<String> }
            let steps = [
                Step(name: "endpoint removed", old: full, new: oneEndpoint, declared: [Set(web4)], deleted: []),
                Step(name: "endpoint added", old: oneEndpoint, new: full, declared: [Set(web4)], deleted: []),
                Step(name: "service added", old: full, new: withAPI, declared: [[s.chain, s.masqueradeChain, api4]], deleted: []),
                Step(name: "service removed", old: withAPI, new: full, declared: [[s.chain, s.masqueradeChain, api4]], deleted: [api4]),
                Step(name: "no change", old: full, new: full, declared: [], deleted: []),
            ]
            for step in steps {
                let result = try applier.update(from: step.old, to: step.new)
                #expect(!result.summary.contains("full apply"), "\(step.name): \(result.summary)")
                #expect(result.changed == !step.declared.isEmpty, "\(step.name)")
                #expect(result.restoreInputs.map(UpdateFixtures.declared) == step.declared, "\(step.name): \(result.restoreInputs)")
                #expect(Set(result.restoreInputs.flatMap(UpdateFixtures.deleted)) == step.deleted, "\(step.name)")
                #expect(result.restoredChains == step.declared.reduce(0) { $0 + $1.count } - step.deleted.count, "\(step.name)")
                #expect(result.deletedChains == step.deleted.count, "\(step.name)")
                // Nothing but the declared chains and deletions: no OUTPUT/POSTROUTING line once the jumps exist.
                #expect(!result.restoreInputs.joined().contains(" OUTPUT") && !result.restoreInputs.joined().contains(" POSTROUTING"))
                try withNamespace("ipt-upd-ref") { reference in
                    let fresh = NodeApplier(context: NodeFixtures.context(reference), backend: .iptables, iptablesVariant: variant)
                    _ = try fresh.apply(step.new, dryRun: false)
                    for family in IPFamily.allCases {
                        #expect(try UpdateFixtures.natContent(node, variant, family) == UpdateFixtures.natContent(reference, variant, family),
                                "\(step.name), \(family)")
                    }
                }
                #expect(try applier.diff(step.new).isEmpty, "\(step.name)")
                if step.name == "endpoint removed" {
                    let r = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 12)
                    #expect(r.failures == 0 && r.servers == ["ep-b"], "the removed endpoint still gets connections: \(r)")
                }
                if step.name == "endpoint added" {
                    let r = try answers(from: node, .tcp, Net.external4, Net.tcpPort, count: 24)
                    #expect(r.failures == 0 && r.servers == ["ep-a", "ep-b"])
                }
                if step.name == "service added" {
                    let r = try answers(from: node, .tcp, UpdateFixtures.apiExternal, Net.tcpPort, count: 4)
                    #expect(r.failures == 0 && r.servers == ["ep-b"])
                }
                if step.name == "service removed" {
                    #expect(try answers(from: node, .tcp, UpdateFixtures.apiExternal, Net.tcpPort, count: 1, timeout: 1).failures == 1)
                }
            }

            // A family the new plan leaves: its chains and jumps go, in one restore; the other family is untouched.
            let v4only = try UpdateFixtures.plan(families: [.ipv4])
            let before4 = try NodeFixtures.save(node, variant, .ipv4)
            let dropped = try applier.update(from: full, to: v4only)
            #expect(dropped.restoreInputs.count == 1 && dropped.deletedChains == 4, "\(dropped.restoreInputs)")
            #expect(NodeFixtures.ourLines(try NodeFixtures.save(node, variant, .ipv6)).isEmpty)
            #expect(try NodeFixtures.save(node, variant, .ipv4) == before4)
            // And back: the family is created with its jumps.
            let back = try applier.update(from: v4only, to: full)
            #expect(back.restoreInputs.count == 1 && back.restoreInputs[0].contains("-A OUTPUT -j HOSTNET-DNAT"))
            #expect(try applier.diff(full).isEmpty)

            // A lost jump: an update between two plans with mappings does not read the jumps (as kube-proxy's
            // partial syncs do not: with legacy each read copies the whole table out of the kernel), so it
            // neither sees nor fixes it; `diff` (which reads everything) does, and the full apply the agent
            // runs every --sync-period puts it back.
            try node.runChecked(["iptables-\(variant.rawValue)", "-t", "nat", "-D", "OUTPUT", "-j", "HOSTNET-DNAT"])
            let partial = try applier.update(from: full, to: full)
            #expect(!partial.changed && partial.restoreInputs.isEmpty, "\(partial.restoreInputs)")
            #expect(try applier.diff(full).contains { $0.contains("add jump OUTPUT -> HOSTNET-DNAT") })
            let fixed = try applier.apply(full, dryRun: false)
            #expect(fixed.changed && fixed.restoreInputs.count == 1 && UpdateFixtures.declared(fixed.restoreInputs[0]).isEmpty)
            #expect(try applier.diff(full).isEmpty)
            #expect(try applier.remove(s))
        }
    }

    /// With `--target kube-proxy` our dispatch rule jumps to kube-proxy's `KUBE-SVC-…`. When the Service is
    /// deleted, kube-proxy deletes that chain in its next restore; the kernel refuses while our jump is there,
    /// and the update must have taken it out.
    @Test(arguments: IptablesVariant.allCases)
    func updateDropsTheJumpIntoADeletedKubeProxyServiceSoKubeProxyCanDeleteItsChain(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-upd-kp") { node in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            // kube-proxy's chains for default/api too, which stays.
            let api = UpdateFixtures.apiServiceChain
            try NodeFixtures.restore(node, variant, .ipv4, """
                *nat
                :\(api) - [0:0]
                :KUBE-SEP-NODETESTAPI - [0:0]
                -A KUBE-SERVICES -d \(UpdateFixtures.apiClusterIP)/32 -p tcp -m comment --comment "default/api:http cluster IP" -m tcp --dport 80 -j \(api)
                -A \(api) -m comment --comment "default/api:http -> 198.51.100.6:8080" -j KUBE-SEP-NODETESTAPI
                -A KUBE-SEP-NODETESTAPI -p tcp -m comment --comment "default/api:http" -m tcp -j DNAT --to-destination 198.51.100.6:8080
                COMMIT

                """)
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let old = try UpdateFixtures.plan(strategy: .kubeProxy, families: [.ipv4], api: true)
            let new = try UpdateFixtures.plan(strategy: .kubeProxy, families: [.ipv4], web: false, api: true)
            #expect(try applier.apply(old, dryRun: false).warnings.isEmpty)
            let web = [NodeFixtures.webServiceChain, NodeFixtures.dnsServiceChain]
            func dispatch() throws -> [String] {
                try NodeFixtures.save(node, variant).split(separator: "\n").filter { $0.hasPrefix("-A HOSTNET-DNAT ") }.map(String.init)
            }
            #expect(try web.allSatisfy { chain in try dispatch().contains { $0.hasSuffix("-j \(chain)") } })

            // What kube-proxy writes once default/web is gone: KUBE-SERVICES rewritten without web, web's
            // service and endpoint chains flushed and deleted.
            let seps = ["KUBE-SEP-NODETESTHTTPA", "KUBE-SEP-NODETESTHTTPB", "KUBE-SEP-NODETESTDNSA", "KUBE-SEP-NODETESTDNSB"]
            let gone = web + seps
            let kubeProxyRestore = "*nat\n:KUBE-SERVICES - [0:0]\n" + gone.map { ":\($0) - [0:0]\n" }.joined()
                + "-A KUBE-SERVICES -d \(UpdateFixtures.apiClusterIP)/32 -p tcp -m comment --comment \"default/api:http cluster IP\" -m tcp --dport 80 -j \(api)\n"
                + "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"
                + gone.map { "-X \($0)\n" }.joined() + "COMMIT\n"
            let tool = "iptables-\(variant.rawValue)-restore"
            // Before the update our rule still jumps into web's chains: the kernel refuses, nothing changes.
            let saved = try NodeFixtures.save(node, variant)
            #expect(try !node.run([tool, "--noflush"], input: kubeProxyRestore).succeeded)
            #expect(try NodeFixtures.save(node, variant) == saved)

            let result = try applier.update(from: old, to: new)
            #expect(!result.summary.contains("full apply"), "\(result.summary)")
            // The dispatch chain, and the masquerade chain (web's external IP is gone); no chain deleted.
            #expect(result.restoreInputs.map(UpdateFixtures.declared) == [[old.settings.chain, old.settings.masqueradeChain]],
                    "\(result.restoreInputs)")
            #expect(result.deletedChains == 0)
            let after = try dispatch()
            #expect(after.count == 1 && after[0].hasPrefix("-A HOSTNET-DNAT -d \(UpdateFixtures.apiExternal)/32") && after[0].hasSuffix("-j \(api)"),
                    "\(after)")

            try node.runChecked([tool, "--noflush"], input: kubeProxyRestore)
            let final = try NodeFixtures.save(node, variant)
            #expect(web.allSatisfy { !final.contains(":\($0) ") })
            #expect(try applier.diff(new).isEmpty)
        }
    }

    /// A new service whose `KUBE-SVC-…` chain kube-proxy has not created yet: the incremental restore is
    /// refused by the kernel (nothing changes), and the update falls back to a full apply, which leaves that
    /// mapping out with a warning and says so.
    @Test(arguments: IptablesVariant.allCases)
    func updateFallsBackToAFullApplyWhenKubeProxyHasNoChainYet(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-upd-fb") { node in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let old = try UpdateFixtures.plan(strategy: .kubeProxy, families: [.ipv4])
            let new = try UpdateFixtures.plan(strategy: .kubeProxy, families: [.ipv4], api: true)
            _ = try applier.apply(old, dryRun: false)
            let result = try applier.update(from: old, to: new)
            #expect(result.summary.contains("full apply instead of an update"), "\(result.summary)")
            #expect(result.warnings.count == 1 && result.warnings[0].contains(UpdateFixtures.apiServiceChain), "\(result.warnings)")
            #expect(!(try NodeFixtures.save(node, variant)).contains(UpdateFixtures.apiExternal))
            #expect(try applier.diff(new).isEmpty)
        }
    }

    /// `--target kube-proxy`, dual-stack, before kube-proxy has made its IPv6 chains: the full apply leaves
    /// the IPv6 family out (no chain, no jump) while the agent's installed plan still has it. Once the chains
    /// exist, the next update must give IPv6 its rules and jump (it reads the jumps for kube-proxy targets and
    /// falls back to a full apply when the restore cannot go in), not leave them to the full sync minutes later.
    @Test(arguments: IptablesVariant.allCases)
    func aFamilyLeftOutForWantOfKubeProxyChainsIsInstalledAtTheNextUpdate(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        try withNamespace("ipt-upd-late") { node in
            try NodeFixtures.restore(node, variant, .ipv4, NodeFixtures.kubeProxyRuleset())
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            let plan = try UpdateFixtures.plan(strategy: .kubeProxy, families: [.ipv4, .ipv6])
            let first = try applier.apply(plan, dryRun: false)
            #expect(!first.warnings.isEmpty, "\(first.summary)")
            #expect(!(try NodeFixtures.save(node, variant, .ipv6)).contains("HOSTNET-DNAT"))
            let chains = [NodeFixtures.webServiceChain, NodeFixtures.dnsServiceChain]
            try NodeFixtures.restore(node, variant, .ipv6, "*nat\n" + chains.map { ":\($0) - [0:0]\n" }.joined() + "COMMIT\n")
            _ = try applier.update(from: plan, to: plan)
            #expect(try NodeFixtures.save(node, variant, .ipv6).contains("-A OUTPUT -j HOSTNET-DNAT"))
            #expect(try applier.diff(plan).isEmpty)
        }
    }

    /// Many mappings (HNDNAT_NODE_SCALE service ports, default 2000): a full apply, then an update that moves
    /// one endpoint restores one chain, leaves the namespace as `diff` expects, and prints both timings.
    @Test(arguments: IptablesVariant.allCases)
    func largePlanUpdateRestoresOneChain(variant: IptablesVariant) throws {
        guard try requireKernelTests(tools: Self.iptablesTools), try Variants.available(variant) else { return }
        let n = Int(ProcessInfo.processInfo.environment["HNDNAT_NODE_SCALE"] ?? "") ?? 2000
        let (before, after) = (try NodeFixtures.scalePlan(n), try NodeFixtures.scalePlan(n, movingOneEndpoint: true))
        try withNamespace("ipt-upd-scale") { node in
            let applier = NodeApplier(context: NodeFixtures.context(node), backend: .iptables, iptablesVariant: variant)
            func timed<T>(_ body: () throws -> T) rethrows -> (T, Double) {
                let start = Date(); let r = try body(); return (r, Date().timeIntervalSince(start))
            }
            let (full, t1) = try timed { try applier.apply(before, dryRun: false) }
            let (update, t2) = try timed { try applier.update(from: before, to: after) }
            #expect(update.restoredChains == 1 && update.deletedChains == 0, "\(update.summary)")
            #expect(update.restoreInputs.count == 1 && update.restoreInputs[0].split(separator: "\n").count == 5, "\(update.restoreInputs)")
            #expect(try applier.diff(after).isEmpty)
            func ms(_ t: Double) -> String { "\(Int((t * 1000).rounded())) ms" }
            print("iptables-\(variant.rawValue), \(n) mappings: apply \(ms(t1)) (\(full.restoreInputs.joined().utf8.count) bytes restored), "
                  + "update of one endpoint \(ms(t2)) (\(update.restoreInputs.joined().utf8.count) bytes)")
            #expect(try applier.remove(after.settings))
        }
    }
}
