import Foundation
import KubeObjects
import NetAddress
import NetlinkBackend
import NodeBackend
import RulePlanning
import ServiceResolution
import TestSupport

/// Addresses of the node/pod test topology (documentation ranges; the ClusterIP is in 198.18.0.0/15,
/// which is never assigned to an interface, only matched by kube-proxy-style rules).
enum Net {
    static let external4 = "203.0.113.10"
    static let external6 = "2001:db8:100::10"
    static let clusterIP4 = "198.18.0.10"
    static let endpoints4 = ["198.51.100.5", "198.51.100.6"]
    static let endpoints6 = ["2001:db8:200::5", "2001:db8:200::6"]
    /// Endpoint ports the echo servers listen on.
    static let tcpTarget = 8080
    static let udpTarget = 5353
    /// Service ports.
    static let tcpPort = 80
    static let udpPort = 53
}

enum NodeFixtures {
    /// `n` LoadBalancer service ports in namespace `scale`, two endpoints each (the scale tests' cluster);
    /// `movingOneEndpoint` replaces the second endpoint of the middle service (an update touches one chain).
    static func scalePlan(_ n: Int, movingOneEndpoint: Bool = false) throws -> RulePlan {
        var objects = ClusterObjects()
        for i in 0..<n {
            let id = ObjectName(namespace: "scale", name: "svc\(i)")
            objects.services.append(Service(id: id, type: "LoadBalancer",
                                            ports: [ServicePort(name: "p", protocol: .tcp, port: 1000 + i / 250)],
                                            loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.\(i % 250 + 1)"))]))
            let second = movingOneEndpoint && i == n / 2 ? 250 : (i + 1) % 200 + 1
            objects.endpointSlices.append(EndpointSlice(
                id: ObjectName(namespace: "scale", name: "svc\(i)-1"), serviceName: "svc\(i)", addressType: "IPv4",
                ports: [EndpointPort(name: "p", port: 8080)],
                endpoints: [Endpoint(addresses: [IPAddress("198.51.100.\(i % 200 + 1)")!]),
                            Endpoint(addresses: [IPAddress("198.51.100.\(second)")!])]))
        }
        let resolution = ServiceResolver(options: ResolutionOptions(target: .endpoints)).resolve(objects)
        return try Planner().plan(resolution, strategy: .endpoints)
    }

    static func ip(_ s: String) -> IPAddress { IPAddress(s)! }

    /// `default/web`: a LoadBalancer service with a TCP port (`http`) and a UDP port (`dns`), ClusterIP
    /// 198.18.0.10, two endpoints per family in the pod namespace.
    static func objects(families: [IPFamily] = [.ipv4, .ipv6], slices: Bool = true, tcpPortName: String = "http",
                        endpoints4: [String] = Net.endpoints4) -> ClusterObjects {
        var objects = ClusterObjects()
        var ingress: [LoadBalancerIngress] = []
        if families.contains(.ipv4) { ingress.append(LoadBalancerIngress(ip: ip(Net.external4))) }
        if families.contains(.ipv6) { ingress.append(LoadBalancerIngress(ip: ip(Net.external6))) }
        let ports = [(tcpPortName, TransportProtocol.tcp, Net.tcpPort, Net.tcpTarget), ("dns", .udp, Net.udpPort, Net.udpTarget)]
        objects.services.append(Service(
            id: ObjectName(namespace: "default", name: "web"), type: "LoadBalancer",
            clusterIPs: families.contains(.ipv4) ? [ip(Net.clusterIP4)] : [], ipFamilies: families,
            ports: ports.map { ServicePort(name: $0.0, protocol: $0.1, port: $0.2, targetPort: String($0.3)) },
            loadBalancerIngress: ingress))
        if slices {
            for (family, eps) in [(IPFamily.ipv4, endpoints4), (.ipv6, Net.endpoints6)] where families.contains(family) {
                objects.endpointSlices.append(EndpointSlice(
                    id: ObjectName(namespace: "default", name: "web-\(family.rawValue.lowercased())"),
                    serviceName: "web", addressType: family.rawValue,
                    ports: ports.map { EndpointPort(name: $0.0, port: $0.3, protocol: $0.1) },
                    endpoints: eps.map { Endpoint(addresses: [ip($0)]) }))
            }
        }
        return objects
    }

    static func plan(strategy: TargetStrategy = .endpoints, settings: PlanSettings = PlanSettings(),
                     families: [IPFamily] = [.ipv4, .ipv6], slices: Bool = true, tcpPortName: String = "http",
                     endpoints4: [String] = Net.endpoints4) throws -> RulePlan {
        let objects = objects(families: families, slices: slices, tcpPortName: tcpPortName, endpoints4: endpoints4)
        let resolution = ServiceResolver(options: ResolutionOptions(target: strategy)).resolve(objects)
        return try Planner(settings: settings).plan(resolution, strategy: strategy)
    }

    static func context(_ ns: TestNamespace) -> NodeContext {
        NodeContext(netns: NetworkNamespace(path: ns.path))
    }

    /// kube-proxy's chain for `default/web:http` over TCP, computed like kube-proxy does.
    static var webServiceChain: String {
        KubeProxyNames.serviceChain(namespace: "default", name: "web", portName: "http", protocol: "TCP")
    }

    /// kube-proxy's chain for `default/web:dns` over UDP.
    static var dnsServiceChain: String {
        KubeProxyNames.serviceChain(namespace: "default", name: "web", portName: "dns", protocol: "UDP")
    }

    /// What kube-proxy in iptables mode (and kubelet) install for `default/web` (http over TCP, dns over
    /// UDP), in the style of a real node: KUBE-SERVICES jumped from nat OUTPUT and PREROUTING, KUBE-SVC
    /// chains spreading over two KUBE-SEP chains with `statistic`, hairpin masquerade marks, and kubelet's
    /// marker chains in mangle.
    static func kubeProxyRuleset() -> String {
        let ports: [(svc: String, name: String, proto: String, port: Int, target: Int, sep: String)] = [
            (webServiceChain, "http", "tcp", Net.tcpPort, Net.tcpTarget, "KUBE-SEP-NODETESTHTTP"),
            (dnsServiceChain, "dns", "udp", Net.udpPort, Net.udpTarget, "KUBE-SEP-NODETESTDNS"),
        ]
        var declarations = """
        *mangle
        :KUBE-IPTABLES-HINT - [0:0]
        :KUBE-KUBELET-CANARY - [0:0]
        COMMIT
        *nat
        :KUBE-SERVICES - [0:0]
        :KUBE-POSTROUTING - [0:0]
        :KUBE-MARK-MASQ - [0:0]
        :KUBE-NODEPORTS - [0:0]

        """
        var rules = """
        -I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
        -I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
        -I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
        -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
        -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE

        """
        for p in ports {
            let seps = ["\(p.sep)A", "\(p.sep)B"]
            declarations += ":\(p.svc) - [0:0]\n:\(seps[0]) - [0:0]\n:\(seps[1]) - [0:0]\n"
            let c = "default/web:\(p.name)"
            rules += "-A KUBE-SERVICES -d \(Net.clusterIP4)/32 -p \(p.proto) -m comment --comment \"\(c) cluster IP\" -m \(p.proto) --dport \(p.port) -j \(p.svc)\n"
            rules += "-A \(p.svc) -m comment --comment \"\(c) -> \(Net.endpoints4[0]):\(p.target)\" -m statistic --mode random --probability 0.50000000000 -j \(seps[0])\n"
            rules += "-A \(p.svc) -m comment --comment \"\(c) -> \(Net.endpoints4[1]):\(p.target)\" -j \(seps[1])\n"
            for (i, sep) in seps.enumerated() {
                rules += "-A \(sep) -s \(Net.endpoints4[i])/32 -m comment --comment \"\(c)\" -j KUBE-MARK-MASQ\n"
                rules += "-A \(sep) -p \(p.proto) -m comment --comment \"\(c)\" -m \(p.proto) -j DNAT --to-destination \(Net.endpoints4[i]):\(p.target)\n"
            }
        }
        rules += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"
        return declarations + rules + "COMMIT\n"
    }

    // MARK: reading a namespace's iptables

    static func save(_ ns: TestNamespace, _ variant: IptablesVariant, _ family: IPFamily = .ipv4) throws -> String {
        let tool = "\(family == .ipv4 ? "iptables" : "ip6tables")-\(variant.rawValue)-save"
        let out = try ns.runChecked([tool]).stdout
        return out.split(separator: "\n").filter { !$0.hasPrefix("#") }.joined(separator: "\n")
    }

    /// Every line that belongs to kube-proxy or kubelet (our own rules that jump to KUBE-SVC chains excluded).
    static func kubeLines(_ save: String) -> [String] {
        save.split(separator: "\n").map(String.init).filter { $0.contains("KUBE-") && !$0.hasPrefix("-A HOSTNET-DNAT") }
    }

    /// Every line that mentions one of our chains.
    static func ourLines(_ save: String, chain: String = "HOSTNET-DNAT") -> [String] {
        save.split(separator: "\n").map(String.init).filter { $0.contains(chain) || $0.contains("HNDNAT-") }
    }

    static func restore(_ ns: TestNamespace, _ variant: IptablesVariant, _ family: IPFamily = .ipv4, _ text: String) throws {
        let tool = "\(family == .ipv4 ? "iptables" : "ip6tables")-\(variant.rawValue)-restore"
        try ns.runChecked([tool, "--noflush"], input: text)
    }
}

/// Which iptables variants can load nat rules in a namespace here (both, on this project's machines).
enum Variants {
    private static let probed: Result<[IptablesVariant], TestSupportError> = {
        do {
            return .success(try withNamespace("iptprobe") { ns in
                var ok: [IptablesVariant] = []
                for v in IptablesVariant.allCases {
                    let works = [("iptables", "192.0.2.9:1"), ("ip6tables", "[2001:db8::9]:1")].allSatisfy { prefix, to in
                        (try? ns.run(["\(prefix)-\(v.rawValue)-restore", "--noflush"],
                                     input: "*nat\n:HNDPROBE - [0:0]\n-A HNDPROBE -p tcp -m statistic --mode random --probability 0.5 -j DNAT --to-destination \(to)\nCOMMIT\n"))?.succeeded == true
                    }
                    if works { ok.append(v) } else { print("iptables variant \(v.rawValue) cannot load nat rules here") }
                }
                return ok
            })
        } catch {
            return .failure(TestSupportError("probing iptables variants: \(error)"))
        }
    }()

    /// Whether tests for `variant` can run; false (after printing why) when the variant is missing here.
    /// Under CI=true, no working variant at all is a failure.
    static func available(_ variant: IptablesVariant, function: String = #function) throws -> Bool {
        let list = try probed.get()
        if list.isEmpty && ProcessInfo.processInfo.environment["CI"]?.lowercased() == "true" {
            throw TestSupportError("\(function): no iptables variant can load nat rules in a namespace under CI=true")
        }
        if !list.contains(variant) { print("skipping \(function) for \(variant.rawValue): variant unavailable") }
        return list.contains(variant)
    }
}

/// A "node" namespace joined by a veth to a "pod" namespace that holds both endpoints of each family,
/// with a TCP echo server on 8080 and a UDP echo server on 5353 at every endpoint address.
func withNodeAndPod<T>(_ label: String, _ body: (_ node: TestNamespace, _ pod: TestNamespace) throws -> T) throws -> T {
    try withNamespaces(2, label: label) { ns in
        let (node, pod) = (ns[0], ns[1])
        try connect(node, pod)
        try addAddresses(pod, Net.endpoints4.map { "\($0)/32" } + Net.endpoints6.map { "\($0)/128" })
        var specs: [(namespace: TestNamespace, transport: TestTransport, address: String, port: Int, name: String)] = []
        for (i, address) in (Net.endpoints4 + Net.endpoints6).enumerated() {
            let name = i % 2 == 0 ? "ep-a" : "ep-b"
            specs.append((pod, .tcp, address, Net.tcpTarget, name))
            specs.append((pod, .udp, address, Net.udpTarget, name))
        }
        // Started one by one with a retry: on a loaded machine a Python server can miss its ready timeout.
        var servers: [EchoServer] = []
        defer { for server in servers { server.stop() } }
        for spec in specs {
            servers.append(try retryingInfrastructure {
                try EchoServer(in: spec.namespace, spec.transport, address: spec.address, port: spec.port, name: spec.name)
            })
        }
        return try body(node, pod)
    }
}

/// Retries a test helper that failed as a process (slow start, killed client), never a network outcome:
/// refused or timed-out exchanges are results, not errors.
func retryingInfrastructure<T>(attempts: Int = 3, _ body: () throws -> T) throws -> T {
    var last: (any Error)?
    for attempt in 1...attempts {
        do { return try body() } catch {
            last = error
            print("test helper failed (attempt \(attempt) of \(attempts)): \(String(describing: error).prefix(300))")
        }
    }
    throw last!
}

/// The servers that answered `count` fresh connections to `host:port`, and how many exchanges failed.
/// 24 connections spread over two endpoints land on only one with probability 2^-23.
func answers(from node: TestNamespace, _ transport: TestTransport, _ host: String, _ port: Int,
             count: Int = 24, timeout: Double = 2, source: String? = nil) throws -> (servers: Set<String>, failures: Int) {
    let replies = try retryingInfrastructure(attempts: 2) {
        try exchange(from: node, transport, host: host, port: port, count: count, timeout: timeout, source: source)
    }
    return (Set(replies.compactMap(\.server)), replies.filter { !$0.succeeded }.count)
}
