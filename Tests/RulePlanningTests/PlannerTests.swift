import KubeObjects
import NetAddress
import RulePlanning
import ServiceResolution
import Testing

private func ip(_ s: String) -> IPAddress { IPAddress(s)! }

private func mapping(_ ns: String, _ name: String, port: String = "https", proto: TransportProtocol = .tcp,
                     ext: String, extPort: Int = 443, to targets: [String]) -> Mapping {
    Mapping(service: ObjectName(namespace: ns, name: name), portName: port, protocol: proto, externalIP: ip(ext),
            port: extPort, source: .loadBalancer,
            target: .endpoints(targets.map { Destination(ip: ip($0), port: 8443) }))
}

private func resolution(_ m: [Mapping]) -> Resolution {
    Resolution(mappings: m, skipped: [], warnings: [], autoFellBackToClusterIP: [])
}

@Suite struct PlannerTests {
    @Test func conflictFailsNamingBothServices() {
        let r = resolution([mapping("a", "one", ext: "203.0.113.1", to: ["198.51.100.1"]),
                            mapping("b", "two", ext: "203.0.113.1", to: ["198.51.100.2"])])
        #expect {
            try Planner().plan(r, strategy: .endpoints)
        } throws: { error in
            guard let e = error as? PlanningError, case .conflicts(let c) = e else { return false }
            return c.count == 1 && c[0].services == ["a/one:https", "b/two:https"]
                && e.description.contains("203.0.113.1:443/TCP is claimed by a/one:https and b/two:https")
        }
    }

    @Test func conflictSkipMapsNeitherAndReportsBoth() throws {
        let r = resolution([mapping("a", "one", ext: "203.0.113.1", to: ["198.51.100.1"]),
                            mapping("b", "two", ext: "203.0.113.1", to: ["198.51.100.2"]),
                            mapping("c", "three", ext: "203.0.113.2", to: ["198.51.100.3"])])
        let plan = try Planner(settings: PlanSettings(onConflict: .skip)).plan(r, strategy: .endpoints)
        #expect(plan.rules.map(\.mapping.service.name) == ["three"])
        #expect(plan.conflicts.count == 1)
        #expect(Set(plan.skipped.map(\.service.name)) == ["one", "two"])
    }

    /// Two unnamed ports of one Service share a target chain (same service, port name, protocol, family);
    /// the chain is made from the first of them in rule order (address, protocol, port), never from whichever
    /// a dictionary happened to yield first. 20 services: a chance pick would be right 2^-20 of the time.
    @Test func aSharedChainIsMadeFromTheFirstRuleWhateverTheInputOrder() throws {
        var mappings: [Mapping] = []
        for i in 1...20 {
            for port in [80, 81] {
                mappings.append(Mapping(service: ObjectName(namespace: "n", name: "s\(i)"), portName: "", protocol: .tcp,
                                        externalIP: ip("203.0.113.\(i)"), port: port, source: .externalIP,
                                        target: .clusterIP(Destination(ip: ip("198.18.0.\(i)"), port: port))))
            }
        }
        let plan = try Planner().plan(resolution(mappings), strategy: .clusterIP)
        #expect(plan.targetChains.count == 20)
        for chain in plan.targetChains {
            #expect(chain.comment.hasSuffix(":80") && chain.target.destinations.map(\.port) == [80], "\(chain.comment)")
        }
        let reversed = try Planner().plan(resolution(mappings.reversed()), strategy: .clusterIP)
        #expect(reversed.targetChains == plan.targetChains && reversed.rules == plan.rules)
    }

    @Test func sameAddressDifferentProtocolIsNoConflict() throws {
        let r = resolution([mapping("a", "dns", port: "dns", proto: .udp, ext: "203.0.113.53", extPort: 53, to: ["198.51.100.1"]),
                            mapping("b", "dns", port: "dns", proto: .tcp, ext: "203.0.113.53", extPort: 53, to: ["198.51.100.1"])])
        let plan = try Planner().plan(r, strategy: .endpoints)
        #expect(plan.rules.count == 2)
        #expect(plan.rules.map(\.mapping.protocol) == [.tcp, .udp])
    }

    @Test func planIsDeterministicAndChainsAreShared() throws {
        var ms: [Mapping] = []
        for i in 1...30 {
            ms.append(mapping("n", "s\(i % 7)", port: "p\(i % 7)", ext: "203.0.113.\(i)", extPort: 1000 + i, to: ["198.51.100.\(i % 7 + 1)"]))
        }
        let a = try Planner().plan(resolution(ms), strategy: .endpoints)
        let b = try Planner().plan(resolution(ms.shuffled()), strategy: .endpoints)
        #expect(a.rules == b.rules)
        #expect(a.targetChains == b.targetChains)
        #expect(a.targetChains.count == 7)
        #expect(a.targetChains.map(\.service) == a.targetChains.map(\.service).sorted())
        #expect(a.rules.map(\.mapping.externalIP) == a.rules.map(\.mapping.externalIP).sorted())
        #expect(a.externalAddresses(.ipv4).count == 30)
    }

    @Test func namesAndCommentsCannotInjectRules() throws {
        let evil = mapping("n", "x\" ; -A OUTPUT -j ACCEPT\n}", port: "p\u{7}", ext: "203.0.113.1", to: ["198.51.100.1"])
        let plan = try Planner().plan(resolution([evil]), strategy: .endpoints)
        let chain = plan.targetChains[0]
        for text in [chain.comment, chain.iptablesName] {
            #expect(!text.contains("\""))
            #expect(!text.contains("\n"))
            #expect(!text.contains(";"))
            #expect(!text.unicodeScalars.contains { $0.value < 0x20 })
        }
        #expect(chain.iptablesName.count <= 28)
    }

    @Test(arguments: [
        PlanSettings(table: "bad table"), PlanSettings(table: ""), PlanSettings(table: "1abc"),
        PlanSettings(chain: "THIS-CHAIN-NAME-IS-TOO-LONG"), PlanSettings(chain: "A;B"),
        PlanSettings(chain: "OUTPUT"), PlanSettings(chain: "DOCKER"), PlanSettings(chain: "KUBE-SERVICES"), PlanSettings(chain: "HNDNAT-X"),
        PlanSettings(priority: -200), PlanSettings(priority: -300),
    ])
    func invalidSettingsAreRejected(settings: PlanSettings) {
        #expect(throws: PlanningError.self) { try Planner(settings: settings).plan(resolution([]), strategy: .auto) }
    }

    @Test func priorityJustAboveConntrackIsAccepted() throws {
        _ = try Planner(settings: PlanSettings(priority: -199)).plan(resolution([]), strategy: .auto)
    }
}

@Suite struct RuleTextTests {
    @Test(arguments: [
        ("shop/web:https", "shop/web:https"),
        ("a\"b\\c\nd;e", "a_b_c_d_e"),
        ("café/ñame:443", "caf_/_ame:443"),
        ("x=1 y.z-_:/", "x=1 y.z-_:/"),
        ("\u{1B}[31mred", "__31mred"),
        (String(repeating: "a", count: 130), String(repeating: "a", count: 120)),
        (String(repeating: "é", count: 130), String(repeating: "_", count: 120)),
    ])
    func commentsKeepOnlyTheSafeAlphabetAndAtMost120Characters(input: String, expected: String) {
        #expect(RuleText.comment(input) == expected)
    }
}
