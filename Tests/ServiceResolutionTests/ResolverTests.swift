import Foundation
import KubeObjects
import NetAddress
import ServiceResolution
import Testing

private func ip(_ s: String) -> IPAddress { IPAddress(s)! }
private let web = ObjectName(namespace: "shop", name: "web")

private func lbService(_ ips: [String], families: [IPFamily] = [.ipv4], clusterIPs: [String] = ["198.18.0.10"],
                       ports: [ServicePort] = [ServicePort(name: "https", port: 443, targetPort: "8443")],
                       ipMode: String? = nil) -> Service {
    Service(id: web, labels: ["app": "web"], type: "LoadBalancer", clusterIPs: clusterIPs.map(ip), ipFamilies: families,
            ports: ports, loadBalancerIngress: ips.map { LoadBalancerIngress(ip: ip($0), ipMode: ipMode) })
}

private func slice(_ name: String, family: String = "IPv4", ports: [EndpointPort], _ endpoints: [Endpoint],
                   service: String = "web") -> EndpointSlice {
    EndpointSlice(id: ObjectName(namespace: "shop", name: name), serviceName: service, addressType: family,
                  ports: ports, endpoints: endpoints)
}

private func resolve(_ services: [Service], _ slices: [EndpointSlice] = [], _ options: ResolutionOptions = ResolutionOptions()) -> Resolution {
    var o = ClusterObjects()
    o.services = services
    o.endpointSlices = slices
    return ServiceResolver(options: options).resolve(o)
}

@Suite struct ResolverTests {
    let httpsSlice = slice("web-1", ports: [EndpointPort(name: "https", port: 8443)], [
        Endpoint(addresses: [ip("198.51.100.2")]),
        Endpoint(addresses: [ip("198.51.100.1")], ready: true),
        Endpoint(addresses: [ip("198.51.100.3")], ready: false),
    ])

    @Test func endpointsTargetUsesReadyEndpointsSorted() {
        let r = resolve([lbService(["203.0.113.10"])], [httpsSlice], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.count == 1)
        let m = r.mappings[0]
        #expect(m.externalIP == ip("203.0.113.10") && m.port == 443 && m.protocol == .tcp && m.source == .loadBalancer)
        #expect(m.target == .endpoints([Destination(ip: ip("198.51.100.1"), port: 8443), Destination(ip: ip("198.51.100.2"), port: 8443)]))
        #expect(r.skipped.isEmpty)
    }

    @Test func servingTerminatingFallbackWhenNothingIsReady() {
        let s = slice("web-1", ports: [EndpointPort(name: "https", port: 8443)], [
            Endpoint(addresses: [ip("198.51.100.5")], ready: false, serving: true, terminating: true),
            Endpoint(addresses: [ip("198.51.100.6")], ready: false, serving: false, terminating: true),
        ])
        let r = resolve([lbService(["203.0.113.10"])], [s], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.first?.target == .endpoints([Destination(ip: ip("198.51.100.5"), port: 8443)]))
    }

    @Test func missingServingMeansServingAndOnlyTheFirstAddressCounts() {
        let s = slice("web-1", ports: [EndpointPort(name: "https", port: 8443)], [
            Endpoint(addresses: [ip("198.51.100.5")], ready: false, serving: nil, terminating: true),
            Endpoint(addresses: [ip("198.51.100.7"), ip("198.51.100.8")], ready: false, serving: nil, terminating: true),
        ])
        let r = resolve([lbService(["203.0.113.10"])], [s], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.first?.target == .endpoints([Destination(ip: ip("198.51.100.5"), port: 8443),
                                                        Destination(ip: ip("198.51.100.7"), port: 8443)]))
    }

    @Test func kubeProxyTargetSkipsPortsWithoutEndpointsWhenSlicesAreKnown() {
        let s = slice("web-1", ports: [EndpointPort(name: "https", port: 8443)], [Endpoint(addresses: [ip("198.51.100.5")], ready: false)])
        let r = resolve([lbService(["203.0.113.10"])], [s], ResolutionOptions(target: .kubeProxy))
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.first?.reason.contains("kube-proxy has no KUBE-SVC chain") == true)
        // Without any slices in the input there is nothing to judge by: the jump is planned.
        #expect(resolve([lbService(["203.0.113.10"])], [], ResolutionOptions(target: .kubeProxy)).mappings.count == 1)
    }

    @Test func clientIPAffinityIsCarriedWithItsTimeoutOnEndpointTargetsOnly() {
        var svc = lbService(["203.0.113.10"])
        svc.sessionAffinity = "ClientIP"
        let r = resolve([svc], [httpsSlice], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.map(\.affinityTimeout) == [10800])
        #expect(r.warnings.isEmpty)
        svc.sessionAffinityTimeoutSeconds = 2
        #expect(resolve([svc], [httpsSlice], ResolutionOptions(target: .endpoints)).mappings.map(\.affinityTimeout) == [2])
        // A ClusterIP or a kube-proxy chain applies the Service's own affinity.
        #expect(resolve([svc], [httpsSlice], ResolutionOptions(target: .clusterIP)).mappings.map(\.affinityTimeout) == [nil])
        #expect(resolve([svc], [httpsSlice], ResolutionOptions(target: .kubeProxy)).mappings.map(\.affinityTimeout) == [nil])
        svc.sessionAffinity = "None"
        #expect(resolve([svc], [httpsSlice], ResolutionOptions(target: .endpoints)).mappings.map(\.affinityTimeout) == [nil])
    }

    @Test func sourceRangesAreTrimmedSplitByFamilyAndApplyToLoadBalancerIPsOnly() {
        var svc = lbService(["203.0.113.10", "2001:db8:100::10"], families: [.ipv4, .ipv6], clusterIPs: ["198.18.0.10", "2001:db8:ffff::10"])
        svc.externalIPs = [ip("192.0.2.20")]
        svc.loadBalancerSourceRanges = [" 203.0.113.0/25", "2001:db8:1::/48 ", "198.51.100.7/24", "203.0.113.0/25"]
        let r = resolve([svc], [httpsSlice, slice("web-6", family: "IPv6", ports: [EndpointPort(name: "https", port: 8443)],
                                                  [Endpoint(addresses: [ip("2001:db8:200::1")])])],
                        ResolutionOptions(target: .endpoints, externalIPAllowlist: [CIDR("192.0.2.0/24")!]))
        let byIP = Dictionary(uniqueKeysWithValues: r.mappings.map { ($0.externalIP.description, $0.sourceRanges.map(\.description)) })
        #expect(byIP["203.0.113.10"] == ["198.51.100.0/24", "203.0.113.0/25"])  // host bits masked, sorted, deduplicated
        #expect(byIP["2001:db8:100::10"] == ["2001:db8:1::/48"])
        #expect(byIP["192.0.2.20"] == [])  // spec.externalIPs are never subject to the ranges
        #expect(r.warnings.isEmpty)
    }

    @Test func theAnnotationIsUsedOnlyWhenTheSpecFieldIsEmpty() {
        var svc = lbService(["203.0.113.10"])
        svc.loadBalancerSourceRangesAnnotation = "203.0.113.0/25, 192.0.2.0/24 ,"
        #expect(resolve([svc], [httpsSlice]).mappings.first?.sourceRanges.map(\.description) == ["192.0.2.0/24", "203.0.113.0/25"])
        svc.loadBalancerSourceRanges = ["198.51.100.0/24"]
        #expect(resolve([svc], [httpsSlice]).mappings.first?.sourceRanges.map(\.description) == ["198.51.100.0/24"])
        svc.loadBalancerSourceRanges = []
        svc.loadBalancerSourceRangesAnnotation = ""
        #expect(resolve([svc], [httpsSlice]).mappings.first?.sourceRanges == [])
    }

    @Test func badRangesAreIgnoredWithAWarningAsKubeProxyDoes() {
        var svc = lbService(["203.0.113.10"])
        svc.loadBalancerSourceRanges = ["203.0.113.0/33", "not-a-cidr", "203.0.113.0/25", "198.51.100.1", ""]
        let r = resolve([svc], [httpsSlice])
        #expect(r.mappings.first?.sourceRanges.map(\.description) == ["203.0.113.0/25"])
        #expect(r.warnings.map(\.code) == [.invalidSourceRange])
        #expect(r.warnings.first?.message.contains("\"not-a-cidr\"") == true)
        #expect(r.warnings.first?.message.contains("3 entries") == true)
        #expect(r.warnings.first?.service == web)
    }

    /// kube-proxy filters the ranges by family and installs no firewall for a family without any: an IPv6
    /// ingress IP of a Service that lists only IPv4 ranges is unrestricted there, and here.
    @Test func aFamilyWithoutRangesIsUnrestrictedAsInKubeProxy() {
        var svc = lbService(["203.0.113.10", "2001:db8:100::10"], families: [.ipv4, .ipv6], clusterIPs: ["198.18.0.10", "2001:db8:ffff::10"])
        svc.loadBalancerSourceRanges = ["203.0.113.0/25"]
        let r = resolve([svc], [httpsSlice, slice("web-6", family: "IPv6", ports: [EndpointPort(name: "https", port: 8443)],
                                                  [Endpoint(addresses: [ip("2001:db8:200::1")])])])
        #expect(r.mappings.first { $0.family == .ipv6 }?.sourceRanges == [])
        #expect(r.mappings.first { $0.family == .ipv4 }?.sourceRanges.count == 1)
    }

    @Test func noReadyEndpointsIsSkippedWithAReason() {
        let s = slice("web-1", ports: [EndpointPort(name: "https", port: 8443)], [Endpoint(addresses: [ip("198.51.100.5")], ready: false)])
        let r = resolve([lbService(["203.0.113.10"])], [s], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.map(\.reason) == ["no ready endpoints for port https (IPv4)"])
        #expect(r.skipped.map(\.code) == [.noReadyEndpoints])
    }

    @Test func slicesAreMatchedByPortNameWithPerSlicePortNumbers() {
        let svc = lbService(["203.0.113.10"], ports: [ServicePort(name: "http", port: 80, targetPort: "http"),
                                                      ServicePort(name: "metrics", port: 9090, targetPort: "9090")])
        let a = slice("web-a", ports: [EndpointPort(name: "http", port: 8080), EndpointPort(name: "metrics", port: 9090)],
                      [Endpoint(addresses: [ip("198.51.100.1")])])
        let b = slice("web-b", ports: [EndpointPort(name: "http", port: 8081)], [Endpoint(addresses: [ip("198.51.100.2")])])
        let r = resolve([svc], [a, b], ResolutionOptions(target: .endpoints))
        let http = r.mappings.first { $0.portName == "http" }
        #expect(http?.target == .endpoints([Destination(ip: ip("198.51.100.1"), port: 8080), Destination(ip: ip("198.51.100.2"), port: 8081)]))
        let metrics = r.mappings.first { $0.portName == "metrics" }
        #expect(metrics?.target == .endpoints([Destination(ip: ip("198.51.100.1"), port: 9090)]))
    }

    @Test func sliceProtocolMustMatchThePort() {
        let svc = lbService(["203.0.113.53"], ports: [ServicePort(name: "dns", protocol: .udp, port: 53)])
        let s = slice("web-1", ports: [EndpointPort(name: "dns", port: 53, protocol: .tcp)], [Endpoint(addresses: [ip("198.51.100.1")])])
        let r = resolve([svc], [s], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.isEmpty)
    }

    @Test func dualStackPairsFamiliesAndAddressTypes() {
        let svc = lbService(["203.0.113.10", "2001:db8:100::10"], families: [.ipv4, .ipv6], clusterIPs: ["198.18.0.10", "2001:db8:ffff::10"])
        let v6 = slice("web-6", family: "IPv6", ports: [EndpointPort(name: "https", port: 8443)], [Endpoint(addresses: [ip("2001:db8:200::1")])])
        let r = resolve([svc], [httpsSlice, v6], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.count == 2)
        for m in r.mappings {
            #expect(m.target.destinations.allSatisfy { $0.ip.family == m.family })
        }
        let c = resolve([svc], [], ResolutionOptions(target: .clusterIP))
        #expect(c.mappings.map(\.target) == [.clusterIP(Destination(ip: ip("198.18.0.10"), port: 443)),
                                             .clusterIP(Destination(ip: ip("2001:db8:ffff::10"), port: 443))])
    }

    @Test func externalIPOfTheOtherFamilyIsSkipped() {
        let r = resolve([lbService(["203.0.113.10", "2001:db8:100::10"])], [httpsSlice], ResolutionOptions(target: .endpoints))
        #expect(r.mappings.map(\.externalIP) == [ip("203.0.113.10")])
        #expect(r.skipped.first?.address == "2001:db8:100::10")
        #expect(r.skipped.first?.reason.hasPrefix("family mismatch") == true)
        #expect(r.skipped.first?.code == .familyMismatch)
    }

    @Test func ipModeProxyIsSkippedUnlessAskedFor() {
        let svc = lbService(["203.0.113.80"], ipMode: "Proxy")
        let r = resolve([svc], [httpsSlice])
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.first?.reason.contains("ipMode Proxy") == true)
        #expect(r.skipped.first?.code == .proxyMode)
        let forced = resolve([svc], [httpsSlice], ResolutionOptions(includeProxyMode: true))
        #expect(forced.mappings.count == 1)
    }

    @Test func hostnameOnlyIngressIsSkipped() {
        var svc = lbService([])
        svc.loadBalancerIngress = [LoadBalancerIngress(hostname: "lb.example.com")]
        let r = resolve([svc], [httpsSlice])
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.map(\.reason) == ["load-balancer ingress has a hostname only, no IP to match"])
        #expect(r.skipped.map(\.code) == [.hostnameOnlyIngress])
    }

    @Test func externalIPsNeedTheAllowlist() {
        var svc = lbService([])
        svc.externalIPs = [ip("192.0.2.20"), ip("198.51.100.99")]
        let none = resolve([svc], [httpsSlice])
        #expect(none.mappings.isEmpty)
        #expect(none.skipped.allSatisfy { $0.reason.contains("--external-ip-cidr") })
        let allowed = resolve([svc], [httpsSlice], ResolutionOptions(externalIPAllowlist: [CIDR("192.0.2.0/24")!]))
        #expect(allowed.mappings.map(\.externalIP) == [ip("192.0.2.20")])
        #expect(allowed.mappings.first?.source == .externalIP)
        #expect(allowed.skipped.map(\.reason) == ["external IP is outside every --external-ip-cidr"])
        #expect(allowed.skipped.map(\.code) == [.externalIPOutsideAllowlist])
    }

    @Test func headlessExternalNameAndNoExternalIPAreSkipped() {
        let headless = Service(id: ObjectName(namespace: "d", name: "db"), headless: true, ports: [ServicePort(port: 5432)])
        let extName = Service(id: ObjectName(namespace: "d", name: "ext"), type: "ExternalName")
        let plain = Service(id: ObjectName(namespace: "d", name: "plain"), clusterIPs: [ip("198.18.0.5")], ports: [ServicePort(port: 80)])
        let r = resolve([headless, extName, plain])
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.map(\.service.name) == ["db", "ext", "plain"])
        #expect(r.skipped[0].reason.contains("headless"))
        #expect(r.skipped[0].code == .headless)
        #expect(r.skipped[1].reason.contains("ExternalName"))
        #expect(r.skipped[2].reason.contains("no external IP"))
    }

    @Test func namespaceAndSelectorFilters() throws {
        let other = Service(id: ObjectName(namespace: "other", name: "x"), ports: [ServicePort(port: 1)],
                            loadBalancerIngress: [LoadBalancerIngress(ip: ip("203.0.113.1"))])
        let r = resolve([lbService(["203.0.113.10"]), other], [httpsSlice],
                        ResolutionOptions(namespaces: ["other"], selector: try LabelSelector("app=web")))
        #expect(r.mappings.isEmpty)
        #expect(r.skipped.map(\.reason) == ["filtered out by --selector app=web", "filtered out by --namespace"])
    }

    @Test func autoUsesEndpointsWhenSlicesExistElseClusterIPWithAWarning() {
        let withSlices = resolve([lbService(["203.0.113.10"])], [httpsSlice])
        #expect(withSlices.mappings.first?.target.strategy == .endpoints)
        #expect(withSlices.warnings.isEmpty)
        let without = resolve([lbService(["203.0.113.10"])])
        #expect(without.mappings.first?.target == .clusterIP(Destination(ip: ip("198.18.0.10"), port: 443)))
        #expect(without.warnings.count == 1)
        #expect(without.warnings[0].message.contains("one DNAT per connection"))
    }

    @Test func kubeProxyTargetUsesKubeProxysChainName() {
        let svc = Service(id: ObjectName(namespace: "ns1", name: "svc1"), clusterIPs: [ip("198.18.0.1")],
                          ports: [ServicePort(name: "p80", port: 80)], loadBalancerIngress: [LoadBalancerIngress(ip: ip("203.0.113.1"))])
        let r = resolve([svc], [], ResolutionOptions(target: .kubeProxy))
        #expect(r.mappings.first?.target == .kubeProxyChain("KUBE-SVC-XPGD46QRK7WJZT7O"))
    }

    @Test func outputDoesNotDependOnInputOrder() {
        let services = (0..<20).map { i in
            Service(id: ObjectName(namespace: "n\(i % 3)", name: "s\(i)"), clusterIPs: [ip("198.18.0.\(i + 1)")],
                    ports: [ServicePort(port: 80 + i)], loadBalancerIngress: [LoadBalancerIngress(ip: ip("203.0.113.\(i + 1)"))])
        }
        let a = resolve(services, [], ResolutionOptions(target: .clusterIP))
        let b = resolve(services.reversed(), [], ResolutionOptions(target: .clusterIP))
        #expect(a.mappings == b.mappings)
        #expect(a.skipped == b.skipped)
    }
}

@Suite struct KubeProxyNameTests {
    @Test(arguments: [
        ("kube-system", "kube-dns", "dns", "UDP", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
        ("default", "kubernetes", "https", "TCP", "KUBE-SVC-NPX46M4PTMTKRN6Y"),
        ("ns1", "svc1", "p80", "TCP", "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ])
    func matchesKubeProxysVectors(ns: String, name: String, port: String, proto: String, expected: String) {
        #expect(KubeProxyNames.serviceChain(namespace: ns, name: name, portName: port, protocol: proto) == expected)
    }

    @Test func sha256StandardVectors() {
        func hex(_ b: [UInt8]) -> String { b.map { String(format: "%02x", $0) }.joined() }
        #expect(hex(SHA256.hash([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hex(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(hex(SHA256.hash([UInt8](repeating: 0x61, count: 1000)))
                == "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }
}

@Suite struct ProxyNameTests {
    static func service(_ name: String, labels: [String: String]) -> Service {
        Service(id: ObjectName(namespace: "ns", name: name), labels: labels, type: "LoadBalancer",
                clusterIPs: [IPAddress("192.0.2.1")!], ports: [ServicePort(port: 80)],
                loadBalancerIngress: [LoadBalancerIngress(ip: IPAddress("203.0.113.1"))])
    }

    static let objects: ClusterObjects = {
        var o = ClusterObjects()
        o.services = [service("plain", labels: [:]),
                      service("cilium", labels: ["service.kubernetes.io/service-proxy-name": "cilium"]),
                      service("headless-label", labels: ["service.kubernetes.io/headless": ""])]
        return o
    }()

    @Test func kubeProxysServicesByDefault() {
        let r = ServiceResolver(options: ResolutionOptions(target: .clusterIP)).resolve(Self.objects)
        #expect(r.mappings.map(\.service.name) == ["plain"])
        #expect(Dictionary(uniqueKeysWithValues: r.skipped.map { ($0.service.name, $0.code) })
                == ["cilium": .otherProxy, "headless-label": .headlessLabel])
        #expect(r.skipped.first { $0.service.name == "cilium" }?.reason.contains("--service-proxy-name cilium") == true)
    }

    @Test func serviceProxyNameSelectsThatProxysServicesInstead() {
        let r = ServiceResolver(options: ResolutionOptions(target: .clusterIP, serviceProxyName: "cilium")).resolve(Self.objects)
        #expect(r.mappings.map(\.service.name) == ["cilium"])
        #expect(Set(r.skipped.map(\.service.name)) == ["plain", "headless-label"])
    }

    @Test func theServerSideSelectorIsKubeProxys() throws {
        #expect(ResolutionOptions().proxySelector == "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")
        #expect(ResolutionOptions(serviceProxyName: "x").proxySelector == "service.kubernetes.io/service-proxy-name=x,!service.kubernetes.io/headless")
        // It parses as a selector and matches as resolution does.
        let selector = try LabelSelector(ResolutionOptions().proxySelector)
        #expect(Self.objects.services.filter { selector.matches($0.labels) }.map(\.id.name) == ["plain"])
    }
}
