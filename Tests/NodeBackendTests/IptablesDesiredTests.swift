import Foundation
import NetAddress
@testable import NodeBackend
import RulePlanning
import RuleRendering
import ServiceResolution
import Testing

/// The desired rules built straight from a plan, against the renderer's text (the other path), and the
/// restore files an update writes. Pure.
@Suite struct IptablesDesiredTests {
    /// kube-proxy's `%0.10f` as written, and what iptables-save 1.8.9 (legacy and nft) printed back for it.
    @Test func probabilitiesReadBackAsSavePrintsThem() {
        let cases: [(Int, String, String)] = [(2, "0.5000000000", "0.50000000000"), (3, "0.3333333333", "0.33333333349"),
                                              (7, "0.1428571429", "0.14285714272")]
        for (n, written, saved) in cases {
            #expect(Probabilities.written(n) == written)
            #expect(Probabilities.savedForm(written: written) == saved, "1/\(n)")
        }
        var p = Probabilities()
        #expect(p.saved(3) == "0.33333333349" && p.saved(3) == "0.33333333349")
    }

    @Test func commentsAreQuotedLikeXtablesSaveString() {
        #expect(IptablesDesired.saveQuoted("default/web:http") == #""default/web:http""#)
        #expect(IptablesDesired.saveQuoted("plain_Name-1") == "plain_Name-1")
        #expect(IptablesDesired.saveQuoted("") == #""""#)
        #expect(IptablesDesired.saveQuoted(#"a"b'c\d e"#) == #""a\"b\'c\\d e""#)
    }

    /// Same chains, same rules in the same order as the renderer's file, once both are normalised; and the
    /// desired lines already are in the spelling save prints (`--ctorigdst` without a prefix, 11 decimals).
    @Test(arguments: [TargetStrategy.endpoints, .clusterIP, .kubeProxy])
    func desiredRulesEqualTheRenderedFile(strategy: TargetStrategy) throws {
        let plan = try NodeFixtures.plan(strategy: strategy)
        for family in IPFamily.allCases {
            let desired = IptablesDesired(plan: plan, family: family)
            // No mappings in a family (no IPv6 ClusterIP here): nothing of ours there at all.
            if plan.rules(family).isEmpty { #expect(desired.isEmpty && desired.chainOrder.isEmpty); continue }
            let rendered = SavedRuleset.parse(IptablesRenderer.render(plan, family: family, options: .init(includeJumps: false))).table("nat")!
            #expect(desired.chainOrder == rendered.chainOrder, "\(strategy) \(family)")
            for chain in rendered.chainOrder {
                let want = rendered.rules(chain).map(RuleNormalizer.normalize)
                let have = desired.rules(chain).map { RuleNormalizer.normalize(SavedRuleset.tokenize($0)) }
                #expect(have == want, "\(strategy) \(family) \(chain)")
            }
            #expect(desired.mappings == plan.rules(family).count)
        }
        if strategy == .endpoints {
            let v4 = IptablesDesired(plan: plan, family: .ipv4)
            #expect(v4.rules("HOSTNET-DNAT-MASQ") == ["-m conntrack --ctstate DNAT --ctorigdst 203.0.113.10 -j MASQUERADE"])
            #expect(v4.allRules.contains { $0.contains("--probability 0.50000000000 -j DNAT") })
        }
    }

    @Test func savedRulesetReadsTargetsAndRunsOfRules() {
        let nat = SavedRuleset.parse(NodeBackendUnitTests.dump).table("nat")!
        #expect(nat.rules("OUTPUT").map(\.target) == ["KUBE-SERVICES", "HOSTNET-DNAT", "OTHER-DNAT", "HOSTNET-DNAT"])
        #expect(nat.rules("HOSTNET-DNAT").first?.text
                == #"-d 203.0.113.10/32 -p tcp -m tcp --dport 80 -m comment --comment "default/web:http" -j HNDNAT-OLD"#)
        #expect(SavedRuleset.jumpTarget(#"-m comment --comment "x -j NOT" -j REAL"#) == "REAL")
        #expect(SavedRuleset.jumpTarget("-p tcp") == nil)
        // Rules of one chain split over two runs still end up together, in order.
        let split = SavedRuleset.parse("*nat\n-A A -j X\n-A B -j Y\n-A A -j Z\nCOMMIT\n").table("nat")!
        #expect(split.rules("A").map(\.target) == ["X", "Z"] && split.chainOrder == ["A", "B"])
    }

    /// The update's restore file, from the plan applied before and the live jumps: only the changed target
    /// chain when an endpoint goes; the dispatch and masquerade chains plus deletion when a service goes.
    @Test func updateScriptsNameOnlyWhatChanged() throws {
        let backend = IptablesBackend(context: NodeContext(), variant: .nft, variantReason: "test")
        let hooks = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j HOSTNET-DNAT\n-A POSTROUTING -j HOSTNET-DNAT-MASQ\nCOMMIT\n"), settings: PlanSettings())
        let full = try NodeFixtures.plan(families: [.ipv4])
        let one = try NodeFixtures.plan(families: [.ipv4], endpoints4: [Net.endpoints4[1]])
        let installed = IptablesOwned(family: .ipv4, installed: IptablesDesired(plan: full, family: .ipv4), hooks: hooks)
        let r = backend.restoreScript(IptablesDesired(plan: one, family: .ipv4), installed, full.settings)
        #expect(Set(r.written) == Set(full.targetChains.map(\.iptablesName)) && r.deleted.isEmpty)
        #expect(!r.script.contains("HOSTNET-DNAT") && !r.script.contains("OUTPUT"))
        #expect(r.script.contains("-j DNAT --to-destination 198.51.100.6:8080") && !r.script.contains("198.51.100.5"))
        #expect(backend.differences(IptablesDesired(plan: full, family: .ipv4), installed, full.settings).isEmpty)

        let none = try NodeFixtures.plan(families: [.ipv6])
        let removed = backend.restoreScript(IptablesDesired(plan: none, family: .ipv4), installed, full.settings)
        #expect(removed.script.contains("-D OUTPUT -j HOSTNET-DNAT\n") && removed.script.contains("-X HOSTNET-DNAT\n"))
        #expect(removed.deleted.count == 2 + full.targetChains.count)
    }

    /// A partial update assumes the jumps are where the last full apply put them and never touches them; a
    /// rollback after it (the other family's restore failed) must not move them either: their real position
    /// (after kube-proxy's KUBE-SERVICES) is unknown to it, and `-I OUTPUT 1` would put ours first.
    @Test func aRollbackLeavesAssumedJumpsAlone() throws {
        let backend = IptablesBackend(context: NodeContext(), variant: .nft, variantReason: "test")
        let settings = PlanSettings()
        let full = try NodeFixtures.plan(families: [.ipv4])
        let assumed = IptablesOwned(family: .ipv4, installed: IptablesDesired(plan: full, family: .ipv4),
                                    hooks: IptablesOwned(family: .ipv4, jumpsInPlace: settings))
        #expect(assumed.jumpsAssumed && assumed.outputJumpInPlace(settings))
        let now = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j HOSTNET-DNAT\n-A POSTROUTING -j HOSTNET-DNAT-MASQ\nCOMMIT\n"), settings: settings)
        let script = backend.rollbackScript(before: assumed, now: now)
        #expect(!script.contains("OUTPUT") && !script.contains("POSTROUTING"), "\(script)")
        #expect(script.contains(":HOSTNET-DNAT - [0:0]"))
        // Jumps that were read are put back where they were.
        let read = IptablesOwned(family: .ipv4, saved: SavedRuleset.parse(
            "*nat\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j HOSTNET-DNAT\nCOMMIT\n"), settings: settings)
        #expect(backend.rollbackScript(before: read, now: now).contains("-I OUTPUT 2 -j HOSTNET-DNAT"))
    }
}
