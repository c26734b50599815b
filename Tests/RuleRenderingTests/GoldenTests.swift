import Foundation
import KubeObjects
import NetAddress
import RulePlanning
import RuleRendering
import ServiceResolution
import Testing

/// The files in examples/rendered are what `hostnet-dnat render` prints for examples/cluster.yaml.
/// This test keeps them current: run with UPDATE_GOLDEN=1 to rewrite them after an intended change.
@Suite struct GoldenTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func examplePlan(_ options: ResolutionOptions, settings: PlanSettings = PlanSettings(),
                            file: String = "cluster.yaml") throws -> RulePlan {
        let bytes = try Array(Data(contentsOf: root.appendingPathComponent("examples/\(file)")))
        let objects = try DocumentLoader.load(bytes, source: "examples/\(file)")
        return try Planner(settings: settings).plan(ServiceResolver(options: options).resolve(objects), strategy: options.target)
    }

    static let allowlist = [CIDR("192.0.2.0/24")!]

    func check(_ text: String, _ name: String) throws {
        let url = GoldenTests.root.appendingPathComponent("examples/rendered/\(name)")
        if ProcessInfo.processInfo.environment["UPDATE_GOLDEN"] == "1" {
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(text.utf8).write(to: url)
        }
        let golden = try String(contentsOf: url, encoding: .utf8)
        #expect(text == golden, "examples/rendered/\(name) is out of date; rerun with UPDATE_GOLDEN=1 and review the diff")
    }

    @Test func exampleClusterRendersToTheCommittedFiles() throws {
        let plan = try GoldenTests.examplePlan(ResolutionOptions(externalIPAllowlist: GoldenTests.allowlist))
        try check(try NftRenderer.render(plan), "cluster.nft")
        try check(IptablesRenderer.render(plan, family: .ipv4), "cluster.rules.v4")
        try check(IptablesRenderer.render(plan, family: .ipv6), "cluster.rules.v6")
        try check(JSONRenderer.render(plan), "cluster.json")
    }

    /// examples/policy.yaml: source ranges (spec and annotation) and ClientIP affinity, in every format.
    @Test func sourceRangesAndAffinityRenderToTheCommittedFiles() throws {
        let plan = try GoldenTests.examplePlan(ResolutionOptions(externalIPAllowlist: GoldenTests.allowlist), file: "policy.yaml")
        try check(try NftRenderer.render(plan), "policy.nft")
        try check(IptablesRenderer.render(plan, family: .ipv4), "policy.rules.v4")
        try check(IptablesRenderer.render(plan, family: .ipv6), "policy.rules.v6")
        try check(JSONRenderer.render(plan), "policy.json")
        #expect(plan.hasSourceRanges)
        #expect(plan.affinityChains.count == 2)
        // The externalIP mapping has no ranges; the affinity chain is shared with the ranged LB mapping.
        let ext = try #require(plan.rules.first { $0.mapping.source == .externalIP })
        #expect(ext.mapping.sourceRanges.isEmpty)
        #expect(plan.nftChain(of: ext) == plan.targetChains[ext.targetIndex].iptablesName)
    }

    @Test func kubeProxyTargetRendersJumpsForIptablesAndIsRefusedForNft() throws {
        let plan = try GoldenTests.examplePlan(ResolutionOptions(target: .kubeProxy, externalIPAllowlist: GoldenTests.allowlist),
                                               settings: PlanSettings(priority: -101, masquerade: false))
        try check(IptablesRenderer.render(plan, family: .ipv4), "cluster-kube-proxy.rules.v4")
        #expect(throws: RenderError.self) { try NftRenderer.render(plan) }
    }

    @Test func clusterIPTargetWithoutMasquerade() throws {
        let plan = try GoldenTests.examplePlan(ResolutionOptions(target: .clusterIP), settings: PlanSettings(masquerade: false))
        try check(try NftRenderer.render(plan), "cluster-cluster-ip.nft")
    }

    @Test func renderingIsByteIdenticalForShuffledInput() throws {
        let bytes = try Array(Data(contentsOf: GoldenTests.root.appendingPathComponent("examples/cluster.yaml")))
        var objects = try DocumentLoader.load(bytes, source: "x")
        let options = ResolutionOptions(externalIPAllowlist: GoldenTests.allowlist)
        func render(_ o: ClusterObjects) throws -> String {
            let plan = try Planner().plan(ServiceResolver(options: options).resolve(o), strategy: .auto)
            return try NftRenderer.render(plan) + IptablesRenderer.render(plan, family: .ipv4) + JSONRenderer.render(plan)
        }
        let expected = try render(objects)
        for _ in 0..<5 {
            objects.services.shuffle()
            objects.endpointSlices.shuffle()
            #expect(try render(objects) == expected)
        }
    }

    @Test func probabilitiesMatchKubeProxyFormatting() throws {
        let dests = (1...3).map { Destination(ip: IPAddress("198.51.100.\($0)")!, port: 80) }
        let m = Mapping(service: ObjectName(namespace: "n", name: "s"), portName: "", protocol: .tcp,
                        externalIP: IPAddress("203.0.113.1")!, port: 80, source: .loadBalancer, target: .endpoints(dests))
        let plan = try Planner().plan(Resolution(mappings: [m], skipped: [], warnings: [], autoFellBackToClusterIP: []), strategy: .endpoints)
        let text = IptablesRenderer.render(plan, family: .ipv4)
        #expect(text.contains("--probability 0.3333333333 -j DNAT --to-destination 198.51.100.1:80"))
        #expect(text.contains("--probability 0.5000000000 -j DNAT --to-destination 198.51.100.2:80"))
        #expect(text.contains("-m comment --comment \"n/s:80\" -j DNAT --to-destination 198.51.100.3:80"))
    }
}
