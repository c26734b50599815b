import Foundation
import KubeObjects
import NetAddress
import NetlinkBackend
@testable import RulePlanning
import ServiceResolution
import TestSupport

/// A service for fixtures: load-balancer IPs, ports, and endpoints per family (documentation addresses only).
struct ServiceSpec {
    var namespace = "default"
    var name: String
    var ips: [String]
    /// (name, protocol, service port, endpoint port)
    var ports: [(String, TransportProtocol, Int, Int)]
    var endpoints4: [String] = []
    var endpoints6: [String] = []
}

enum Fixtures {
    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    static func objects(_ specs: [ServiceSpec]) -> ClusterObjects {
        var objects = ClusterObjects()
        for s in specs {
            let id = ObjectName(namespace: s.namespace, name: s.name)
            objects.services.append(Service(
                id: id, type: "LoadBalancer",
                ports: s.ports.map { ServicePort(name: $0.0, protocol: $0.1, port: $0.2, targetPort: String($0.3)) },
                loadBalancerIngress: s.ips.map { LoadBalancerIngress(ip: ip($0)) }))
            for (family, eps) in [("IPv4", s.endpoints4), ("IPv6", s.endpoints6)] where !eps.isEmpty {
                objects.endpointSlices.append(EndpointSlice(
                    id: ObjectName(namespace: s.namespace, name: "\(s.name)-\(family.lowercased())"),
                    serviceName: s.name, addressType: family,
                    ports: s.ports.map { EndpointPort(name: $0.0, port: $0.3, protocol: $0.1) },
                    endpoints: eps.map { Endpoint(addresses: [ip($0)]) }))
            }
        }
        return objects
    }

    /// `ranges` and `affinity` (ClientIP timeout in seconds) are given to every service, or to those named in
    /// `policyFor`.
    static func plan(_ specs: [ServiceSpec], settings: PlanSettings = PlanSettings(),
                     strategy: TargetStrategy = .endpoints, ranges: [String] = [], affinity: Int? = nil,
                     policyFor: Set<String>? = nil) throws -> RulePlan {
        var objects = objects(specs)
        for i in objects.services.indices where policyFor?.contains(objects.services[i].id.name) ?? true {
            objects.services[i].loadBalancerSourceRanges = ranges
            if let affinity { objects.services[i].sessionAffinity = "ClientIP"; objects.services[i].sessionAffinityTimeoutSeconds = affinity }
        }
        let resolution = ServiceResolver(options: ResolutionOptions(target: strategy)).resolve(objects)
        return try Planner(settings: settings).plan(resolution, strategy: strategy)
    }

    /// dns with source ranges and api with ClientIP affinity (60 s), the other services plain; or the
    /// services named in `ranged` with `ranges`, and those in `sticky` with affinity for `timeout` seconds.
    static func mixedPolicyPlan(_ specs: [ServiceSpec], settings: PlanSettings = PlanSettings(),
                                ranged: Set<String> = ["dns"], ranges: [String] = ["203.0.113.0/25"],
                                sticky: Set<String> = ["api"], timeout: Int = 60) throws -> RulePlan {
        var objects = objects(specs)
        for i in objects.services.indices {
            if ranged.contains(objects.services[i].id.name) { objects.services[i].loadBalancerSourceRanges = ranges }
            if sticky.contains(objects.services[i].id.name) {
                objects.services[i].sessionAffinity = "ClientIP"; objects.services[i].sessionAffinityTimeoutSeconds = timeout
            }
        }
        let resolution = ServiceResolver(options: ResolutionOptions(target: .endpoints)).resolve(objects)
        return try Planner(settings: settings).plan(resolution, strategy: .endpoints)
    }

    /// IPv4 and IPv6, single and multiple destinations, TCP and UDP.
    static let sample: [ServiceSpec] = [
        ServiceSpec(name: "web", ips: ["203.0.113.10", "2001:db8::10"], ports: [("https", .tcp, 443, 8443), ("http", .tcp, 80, 8080)],
                    endpoints4: ["198.51.100.5", "198.51.100.6"], endpoints6: ["2001:db8::5", "2001:db8::6", "2001:db8::7"]),
        ServiceSpec(name: "dns", ips: ["203.0.113.11"], ports: [("dns", .udp, 53, 53), ("dns-tcp", .tcp, 53, 53)],
                    endpoints4: ["198.51.100.7"]),
        ServiceSpec(namespace: "prod", name: "api", ips: ["203.0.113.12", "203.0.113.13", "2001:db8::12"], ports: [("", .tcp, 8000, 9000)],
                    endpoints4: ["198.51.100.8", "198.51.100.9"], endpoints6: ["2001:db8::8"]),
    ]

    static func samplePlan(table: String = "hostnet-dnat", priority: Int = -99, masquerade: Bool = true) throws -> RulePlan {
        try plan(sample, settings: PlanSettings(table: table, priority: priority, masquerade: masquerade))
    }

    /// `samplePlan` with a nat priority the planner refuses and the kernel too (at or below conntrack's
    /// -200): a plan the backend sends and the kernel rejects, to test that a refused batch changes nothing.
    static func samplePlanTheKernelRefuses(table: String = "hostnet-dnat") throws -> RulePlan {
        let p = try samplePlan(table: table)
        return RulePlan(settings: PlanSettings(table: table, priority: -300, masquerade: true), strategy: p.strategy,
                        rules: p.rules, targetChains: p.targetChains, skipped: p.skipped, conflicts: p.conflicts, warnings: p.warnings)
    }

    /// `mappings` dispatch entries: services of 20 ports each on addresses 203.0.113.1-250 (every fourth
    /// service IPv6 on 2001:db8::/32 instead); service i has 1 + i % maxEndpoints endpoints.
    static func largePlan(mappings: Int, maxEndpoints: Int = 2, table: String = "hostnet-dnat") throws -> RulePlan {
        try plan(largeSpecs(mappings: mappings, maxEndpoints: maxEndpoints), settings: PlanSettings(table: table))
    }

    /// The services of `largePlan`.
    static func largeSpecs(mappings: Int, maxEndpoints: Int = 2) -> [ServiceSpec] {
        let perService = 20
        var specs: [ServiceSpec] = []
        for i in 0..<(mappings / perService) {
            let v6 = i % 4 == 3
            let address = v6 ? "2001:db8:\(String(i / 250, radix: 16))::\(String(i % 250 + 1, radix: 16))" : "203.0.113.\(i % 250 + 1)"
            let base = 1000 + (i / 250) * perService
            let ports = (0..<perService).map { k in ("p\(k)", k % 2 == 0 ? TransportProtocol.tcp : .udp, base + k, 8000 + k) }
            let n = 1 + i % maxEndpoints
            let e4 = (0..<n).map { k in "198.51.100.\((i + k) % 250 + 1)" }
            let e6 = ["2001:db8:ffff::\(String(i, radix: 16))"] + (1..<max(n, 1)).map { k in "2001:db8:fffe::\(String(k, radix: 16))" }
            specs.append(ServiceSpec(namespace: "ns\(i % 7)", name: "svc\(i)", ips: [address], ports: ports,
                                     endpoints4: v6 ? [] : e4, endpoints6: v6 ? e6 : []))
        }
        return specs
    }
}

extension TestNamespace {
    var netns: NetworkNamespace { NetworkNamespace(path: path) }
    var backend: NftablesNetlink { NftablesNetlink(namespace: netns) }
}

/// `nft list …` output with the element lists sorted: nft prints set and map elements in hash order.
func normalizeListing(_ text: String) -> String {
    var lines: [String] = []
    var pending: String?
    for raw in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
        if var p = pending {
            p += " " + raw.trimmingCharacters(in: .whitespaces)
            if raw.hasSuffix("}") { lines.append(p); pending = nil } else { pending = p }
            continue
        }
        if raw.contains("elements = {") && !raw.hasSuffix("}") { pending = raw; continue }
        lines.append(raw)
    }
    if let p = pending { lines.append(p) }
    return lines.map(sortBraceLists).joined(separator: "\n")
}

/// Sorts the items of every innermost `{ a, b, c }` on a line.
private func sortBraceLists(_ line: String) -> String {
    var chars = Array(line)
    var i = 0
    while i < chars.count {
        guard chars[i] == "{" else { i += 1; continue }
        guard let close = chars[(i + 1)...].firstIndex(of: "}") else { break }
        if let nested = chars[(i + 1)..<close].firstIndex(of: "{") { i = nested; continue }
        let inner = String(chars[(i + 1)..<close]).trimmingCharacters(in: .whitespaces)
        let sorted = " " + inner.components(separatedBy: ", ").map { $0.trimmingCharacters(in: .whitespaces) }.sorted().joined(separator: ", ") + " "
        let replacement = Array(sorted)
        chars.replaceSubrange((i + 1)..<close, with: replacement)
        i = i + 1 + replacement.count + 1
    }
    return String(chars)
}
