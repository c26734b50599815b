import KubeObjects
import NetAddress

/// Where a mapping's connections are sent. Netfilter applies one DNAT per connection, so "external IP →
/// ClusterIP" only works where the ClusterIP is translated after nat OUTPUT (IPVS); hence a choice.
public enum TargetStrategy: String, Sendable, CaseIterable, Codable {
    /// Per service: endpoints when EndpointSlices for it are known, else the ClusterIP (with a warning).
    case auto
    /// DNAT straight to ready endpoints; works with every proxy; must be re-synced when endpoints change.
    case endpoints
    /// DNAT to the Service VIP; right only where the VIP is served after nat OUTPUT (IPVS mode).
    case clusterIP = "cluster-ip"
    /// Jump to kube-proxy's `KUBE-SVC-…` chain (iptables only); stays current by itself.
    case kubeProxy = "kube-proxy"
}

/// Which field an external address came from.
public enum ExternalSource: String, Sendable, Hashable, Codable {
    case loadBalancer
    case externalIP
}

/// An address and port a connection is translated to.
public struct Destination: Sendable, Hashable, Comparable, CustomStringConvertible {
    public let ip: IPAddress
    public let port: Int
    public init(ip: IPAddress, port: Int) { self.ip = ip; self.port = port }
    public static func < (a: Destination, b: Destination) -> Bool { (a.ip, a.port) < (b.ip, b.port) }
    public var description: String { "\(ip.bracketed):\(port)" }
}

/// What a mapping leads to.
public enum MappingTarget: Sendable, Hashable {
    /// One or more endpoints, spread evenly (sorted, deduplicated).
    case endpoints([Destination])
    case clusterIP(Destination)
    /// A kube-proxy `KUBE-SVC-…` chain name.
    case kubeProxyChain(String)

    public var strategy: TargetStrategy {
        switch self {
        case .endpoints: return .endpoints
        case .clusterIP: return .clusterIP
        case .kubeProxyChain: return .kubeProxy
        }
    }

    /// `destinations.count`, without copying the list (or, for a ClusterIP, making one): the planner and
    /// the backends ask this of every mapping.
    @inlinable public var destinationCount: Int {
        switch self {
        case .endpoints(let d): return d.count
        case .clusterIP: return 1
        case .kubeProxyChain: return 0
        }
    }

    /// `self == other`, inlinable: a diff of two plans asks it of every mapping, and the synthesized `==`
    /// (another module's, not inlinable) is called on copies.
    @inlinable public func isSame(as other: MappingTarget) -> Bool {
        switch (self, other) {
        case let (.endpoints(a), .endpoints(b)): return a == b
        case let (.clusterIP(a), .clusterIP(b)): return a == b
        case let (.kubeProxyChain(a), .kubeProxyChain(b)): return a == b
        default: return false
        }
    }

    /// The destinations DNAT picks from; empty for a kube-proxy jump.
    public var destinations: [Destination] {
        switch self {
        case .endpoints(let d): return d
        case .clusterIP(let d): return [d]
        case .kubeProxyChain: return []
        }
    }
}

/// `externalIP:port/protocol → target` for one service port.
public struct Mapping: Sendable, Hashable {
    public let service: ObjectName
    public let portName: String
    public let `protocol`: TransportProtocol
    public let externalIP: IPAddress
    public let port: Int
    public let source: ExternalSource
    public let target: MappingTarget
    /// Only connections whose source address is inside one of these blocks are translated
    /// (`loadBalancerSourceRanges` of the mapping's family, sorted, deduplicated); empty means every source.
    /// Only load-balancer ingress IPs carry ranges, never `spec.externalIPs` (as in kube-proxy).
    public let sourceRanges: [CIDR]
    /// `sessionAffinity: ClientIP`: a client keeps the endpoint it was given until this many seconds pass
    /// without a new connection from it. nil: every connection picks at random. Only endpoint targets carry
    /// it (a ClusterIP or a kube-proxy chain applies the Service's own affinity).
    public let affinityTimeout: Int?

    public init(service: ObjectName, portName: String, protocol: TransportProtocol, externalIP: IPAddress,
                port: Int, source: ExternalSource, target: MappingTarget, sourceRanges: [CIDR] = [],
                affinityTimeout: Int? = nil) {
        self.service = service; self.portName = portName; self.protocol = `protocol`
        self.externalIP = externalIP; self.port = port; self.source = source; self.target = target
        self.sourceRanges = sourceRanges; self.affinityTimeout = affinityTimeout
    }

    public var family: IPFamily { externalIP.family }

    /// The same mapping leading elsewhere (every other field kept).
    public func replacingTarget(_ target: MappingTarget) -> Mapping {
        Mapping(service: service, portName: portName, protocol: `protocol`, externalIP: externalIP, port: port,
                source: source, target: target, sourceRanges: sourceRanges, affinityTimeout: affinityTimeout)
    }
}

/// Why something was not mapped. Every service that is not fully mapped gets at least one.
public struct SkippedItem: Sendable, Hashable, Comparable {
    public let service: ObjectName
    /// The port name or number, when the reason is about one port.
    public let port: String?
    /// The external address, when the reason is about one address.
    public let address: String?
    /// Machine-readable: JSON `code`, metric label.
    public let code: SkipReason
    /// The sentence people read.
    public let reason: String

    public init(service: ObjectName, port: String? = nil, address: String? = nil, code: SkipReason, reason: String) {
        self.service = service; self.port = port; self.address = address; self.code = code; self.reason = reason
    }

    public static func < (a: SkippedItem, b: SkippedItem) -> Bool {
        (a.service, a.port ?? "", a.address ?? "", a.reason) < (b.service, b.port ?? "", b.address ?? "", b.reason)
    }
}

public struct ResolutionOptions: Sendable {
    public var target: TargetStrategy
    /// `spec.externalIPs` are honoured only inside these blocks (CVE-2020-8554); empty means never.
    public var externalIPAllowlist: [CIDR]
    /// Also map ingress IPs with `ipMode: Proxy`, which kube-proxy deliberately leaves alone.
    public var includeProxyMode: Bool
    /// Only these namespaces; empty means all.
    public var namespaces: Set<String>
    public var selector: LabelSelector?
    /// `--service-proxy-name`: map the Services of that alternative proxy (labelled
    /// `service.kubernetes.io/service-proxy-name: <name>`) instead of kube-proxy's (which carry no such label).
    public var serviceProxyName: String?

    public init(target: TargetStrategy = .auto, externalIPAllowlist: [CIDR] = [], includeProxyMode: Bool = false,
                namespaces: Set<String> = [], selector: LabelSelector? = nil, serviceProxyName: String? = nil) {
        self.target = target; self.externalIPAllowlist = externalIPAllowlist
        self.includeProxyMode = includeProxyMode; self.namespaces = namespaces; self.selector = selector
        self.serviceProxyName = serviceProxyName
    }

    /// The label that hands a Service to another proxy, and the one that marks it headless (kube-proxy lists
    /// with `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`).
    public static let serviceProxyNameLabel = "service.kubernetes.io/service-proxy-name"
    public static let headlessLabel = "service.kubernetes.io/headless"

    /// The label selector a proxy with these options lists Services and EndpointSlices with: what the API
    /// source sends to the server, so that other proxies' objects never travel.
    public var proxySelector: String {
        let proxy = serviceProxyName.map { "\(Self.serviceProxyNameLabel)=\($0)" } ?? "!\(Self.serviceProxyNameLabel)"
        return "\(proxy),!\(Self.headlessLabel)"
    }
}

public struct Resolution: Sendable {
    public var mappings: [Mapping]
    public var skipped: [SkippedItem]
    /// Things a user should know even though nothing failed (for stderr, logs and metrics).
    public var warnings: [Diagnostic]
    /// Services that `auto` sent to their ClusterIP because no EndpointSlices were given.
    public var autoFellBackToClusterIP: [ObjectName]

    public init(mappings: [Mapping], skipped: [SkippedItem] = [], warnings: [Diagnostic] = [], autoFellBackToClusterIP: [ObjectName] = []) {
        self.mappings = mappings; self.skipped = skipped; self.warnings = warnings
        self.autoFellBackToClusterIP = autoFellBackToClusterIP
    }
}

extension String {
    /// Without leading and trailing spaces, tabs and newlines (Go's strings.TrimSpace for ASCII input).
    func trimmingWhitespace() -> String {
        let ws: Set<Character> = [" ", "\t", "\n", "\r", "\u{0B}", "\u{0C}"]
        guard let first = firstIndex(where: { !ws.contains($0) }), let last = lastIndex(where: { !ws.contains($0) }) else { return "" }
        return String(self[first...last])
    }
}

/// Services + EndpointSlices → mappings, with kube-proxy's semantics for which addresses are external,
/// which endpoints are used and which family goes where.
public struct ServiceResolver: Sendable {
    public let options: ResolutionOptions

    public init(options: ResolutionOptions) { self.options = options }

    public func resolve(_ objects: ClusterObjects) -> Resolution {
        var slicesByService: [ObjectName: [EndpointSlice]] = [:]
        for slice in objects.endpointSlices {
            guard let svc = slice.serviceName else { continue }
            slicesByService[ObjectName(namespace: slice.id.namespace, name: svc), default: []].append(slice)
        }
        var result = Resolution(mappings: [], skipped: [], warnings: [], autoFellBackToClusterIP: [])
        // Sort so that output never depends on input order.
        let services = objects.services.sorted { $0.id < $1.id }
        var seen = Set<ObjectName>()
        for service in services {
            if !seen.insert(service.id).inserted {
                result.warnings.append(Diagnostic(.warning, .duplicateObject, service: service.id,
                                                  "\(service.id) appears more than once in the input; the first copy is used"))
                continue
            }
            resolve(service, slices: slicesByService[service.id], into: &result)
        }
        if let w = Self.autoFallbackWarning(result.autoFellBackToClusterIP) { result.warnings.append(w) }
        result.skipped.sort()
        return result
    }

    /// One service on its own: what the agent re-resolves when that service or one of its slices changes.
    /// The cluster-wide `autoFallbackWarning` is left to the caller, which knows every service.
    public func resolve(_ service: Service, slices: [EndpointSlice]) -> Resolution {
        var result = Resolution(mappings: [], skipped: [], warnings: [], autoFellBackToClusterIP: [])
        resolve(service, slices: slices, into: &result)
        result.skipped.sort()
        return result
    }

    /// The one warning for every service `auto` sent to its ClusterIP for lack of EndpointSlices (nil: none).
    public static func autoFallbackWarning(_ services: [ObjectName]) -> Diagnostic? {
        guard !services.isEmpty else { return nil }
        let names = services.prefix(5).map(\.description).joined(separator: ", ")
        let more = services.count > 5 ? " and \(services.count - 5) more" : ""
        return Diagnostic(.warning, .autoFellBackToClusterIP, service: services.count == 1 ? services[0] : nil,
            "target auto: no EndpointSlices in the input for \(names)\(more); their rules DNAT to the ClusterIP. "
            + "Netfilter applies one DNAT per connection, so with kube-proxy in iptables or nftables mode that "
            + "ClusterIP is never translated and connections time out. Include EndpointSlices "
            + "(kubectl get services,endpointslices -A -o json) or choose --target explicitly.")
    }

    private func skip(_ r: inout Resolution, _ s: Service, port: String? = nil, address: String? = nil,
                      _ code: SkipReason, _ reason: String) {
        r.skipped.append(SkippedItem(service: s.id, port: port, address: address, code: code, reason: reason))
    }

    private func resolve(_ service: Service, slices: [EndpointSlice]?, into result: inout Resolution) {
        let skippedBefore = result.skipped.count
        if !options.namespaces.isEmpty && !options.namespaces.contains(service.id.namespace) {
            return skip(&result, service, .filteredByNamespace, "filtered out by --namespace")
        }
        if let selector = options.selector, !selector.matches(service.labels) {
            return skip(&result, service, .filteredBySelector, "filtered out by --selector \(selector)")
        }
        let owner = service.labels[ResolutionOptions.serviceProxyNameLabel]
        if owner != options.serviceProxyName {
            if let owner {
                return skip(&result, service, .otherProxy,
                            "labelled \(ResolutionOptions.serviceProxyNameLabel)=\(owner): another proxy's service"
                            + " (--service-proxy-name \(owner) selects it)")
            }
            return skip(&result, service, .otherProxy,
                        "no \(ResolutionOptions.serviceProxyNameLabel)=\(options.serviceProxyName ?? "") label: kube-proxy's service, not --service-proxy-name's")
        }
        if service.labels[ResolutionOptions.headlessLabel] != nil {
            return skip(&result, service, .headlessLabel,
                        "labelled \(ResolutionOptions.headlessLabel): kube-proxy programs nothing for it")
        }
        if service.type == "ExternalName" {
            return skip(&result, service, .externalName, "ExternalName service: kube-proxy programs nothing for it")
        }
        if service.headless {
            return skip(&result, service, .headless, "headless service (clusterIP: None): no virtual IP to translate")
        }

        // External addresses, in a stable order, deduplicated.
        var candidates: [(IPAddress, ExternalSource)] = []
        var seenIPs = Set<IPAddress>()
        for ingress in service.loadBalancerIngress {
            guard let ip = ingress.ip else {
                if let host = ingress.hostname {
                    skip(&result, service, address: host, .hostnameOnlyIngress, "load-balancer ingress has a hostname only, no IP to match")
                }
                continue
            }
            if ingress.ipMode == "Proxy" && !options.includeProxyMode {
                skip(&result, service, address: ip.description, .proxyMode,
                     "ipMode Proxy: the load balancer must see this traffic (kube-proxy skips it too); --include-proxy-mode maps it anyway")
                continue
            }
            if seenIPs.insert(ip).inserted { candidates.append((ip, .loadBalancer)) }
        }
        for ip in service.externalIPs {
            if options.externalIPAllowlist.isEmpty {
                skip(&result, service, address: ip.description, .externalIPNotAllowed,
                     "spec.externalIPs are honoured only inside an allowlist (CVE-2020-8554); pass --external-ip-cidr")
                continue
            }
            guard options.externalIPAllowlist.contains(where: { $0.contains(ip) }) else {
                skip(&result, service, address: ip.description, .externalIPOutsideAllowlist, "external IP is outside every --external-ip-cidr")
                continue
            }
            if seenIPs.insert(ip).inserted { candidates.append((ip, .externalIP)) }
        }
        if candidates.isEmpty {
            if result.skipped.count == skippedBefore {
                skip(&result, service, .noExternalIP, "no external IP: no load-balancer ingress IP and no spec.externalIPs")
            }
            return
        }
        if service.ports.isEmpty {
            return skip(&result, service, .noPorts, "no ports")
        }

        // The service's families: spec.ipFamilies, else the ClusterIPs' families; unknown means no filter.
        var families = service.ipFamilies
        if families.isEmpty { families = service.clusterIPs.map(\.family) }
        var usable: [(IPAddress, ExternalSource)] = []
        for (ip, source) in candidates {
            if !families.isEmpty && !families.contains(ip.family) {
                let have = families.map(\.rawValue).joined(separator: ", ")
                skip(&result, service, address: ip.description, .familyMismatch,
                     "family mismatch: \(ip.family.rawValue) external IP, but the service is \(have) only")
                continue
            }
            usable.append((ip, source))
        }

        let hasSlices = !(slices ?? []).isEmpty
        var strategy = options.target
        if strategy == .auto {
            strategy = hasSlices ? .endpoints : .clusterIP
            if !hasSlices { result.autoFellBackToClusterIP.append(service.id) }
        }

        let ranges = sourceRanges(of: service, into: &result)
        // ClusterIP and kube-proxy targets reach a proxy that applies the Service's affinity itself.
        let affinity = service.sessionAffinity == "ClientIP" && strategy == .endpoints
            ? (service.sessionAffinityTimeoutSeconds ?? Service.defaultAffinityTimeoutSeconds) : nil
        for port in service.ports {
            let portLabel = port.name.isEmpty ? String(port.port) : port.name
            var targetByFamily: [IPFamily: MappingTarget?] = [:]
            for (ip, source) in usable {
                let family = ip.family
                if targetByFamily[family] == nil {
                    let target = self.target(for: port, family: family, strategy: strategy, service: service,
                                             slices: slices ?? [], portLabel: portLabel, into: &result)
                    targetByFamily[family] = .some(target)
                }
                guard let target = targetByFamily[family]! else { continue }
                result.mappings.append(Mapping(service: service.id, portName: port.name, protocol: port.protocol,
                                               externalIP: ip, port: port.port, source: source, target: target,
                                               sourceRanges: source == .loadBalancer ? ranges[family] ?? [] : [],
                                               affinityTimeout: target.destinations.isEmpty ? nil : affinity))
            }
        }
    }

    /// `loadBalancerSourceRanges` (or, when that is empty, the annotation cloud load balancers read), trimmed,
    /// parsed and split by family, as kube-proxy does: an entry that is not a CIDR is ignored with a warning.
    /// A family without entries is unrestricted even when the other family has some: kube-proxy installs no
    /// firewall for that family either, so translating it opens nothing that kube-proxy keeps shut.
    func sourceRanges(of service: Service, into result: inout Resolution) -> [IPFamily: [CIDR]] {
        let fromSpec = !service.loadBalancerSourceRanges.isEmpty
        let entries = fromSpec ? service.loadBalancerSourceRanges
            : (service.loadBalancerSourceRangesAnnotation ?? "").split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let field = fromSpec ? "spec.loadBalancerSourceRanges" : "annotation \(Service.sourceRangesAnnotation)"
        var byFamily: [IPFamily: Set<CIDR>] = [:]
        var bad: [String] = []
        for entry in entries {
            let text = entry.trimmingWhitespace()
            if text.isEmpty { continue }
            guard let cidr = CIDR(text) else { bad.append(text); continue }
            byFamily[cidr.address.family, default: []].insert(cidr)
        }
        if !bad.isEmpty {
            let shown = bad.prefix(5).map { "\"\(KubeObjects.InputError.printable($0, limit: 60))\"" }.joined(separator: ", ")
            result.warnings.append(Diagnostic(.warning, .invalidSourceRange, service: service.id,
                "\(service.id): \(field) has \(bad.count) entr\(bad.count == 1 ? "y" : "ies") that \(bad.count == 1 ? "is" : "are") not a CIDR "
                + "(\(shown)\(bad.count > 5 ? ", …" : "")); ignored, as kube-proxy ignores them"))
        }
        return byFamily.mapValues { $0.sorted { ($0.address, $0.prefixLength) < ($1.address, $1.prefixLength) } }
    }

    private func target(for port: ServicePort, family: IPFamily, strategy: TargetStrategy, service: Service,
                        slices: [EndpointSlice], portLabel: String, into result: inout Resolution) -> MappingTarget? {
        switch strategy {
        case .kubeProxy:
            // kube-proxy creates no KUBE-SVC chain for a port without usable endpoints; when the input has
            // the service's slices, say so here instead of failing later on a missing chain.
            if !slices.isEmpty && endpoints(for: port, family: family, slices: slices).destinations.isEmpty {
                skip(&result, service, port: portLabel, .noReadyEndpoints,
                     "no ready endpoints for port \(portLabel) (\(family.rawValue)): kube-proxy has no KUBE-SVC chain for it")
                return nil
            }
            return .kubeProxyChain(KubeProxyNames.serviceChain(
                namespace: service.id.namespace, name: service.id.name, portName: port.name, protocol: port.protocol.rawValue))
        case .clusterIP:
            guard let vip = clusterIP(of: service, family: family) else {
                skip(&result, service, port: portLabel, .noClusterIP, "no \(family.rawValue) ClusterIP to send \(family.rawValue) traffic to")
                return nil
            }
            return .clusterIP(Destination(ip: vip, port: port.port))
        case .endpoints, .auto:
            let (chosen, sawSliceOfFamily) = endpoints(for: port, family: family, slices: slices)
            if chosen.isEmpty {
                let why = sawSliceOfFamily ? "no ready endpoints" : "no \(family.rawValue) EndpointSlices"
                skip(&result, service, port: portLabel, sawSliceOfFamily ? .noReadyEndpoints : .noEndpointSlicesOfFamily, "\(why) for port \(portLabel) (\(family.rawValue))")
                return nil
            }
            return .endpoints(chosen)
        }
    }

    /// The port's endpoints of one family, as kube-proxy picks them: slices matched by port name and
    /// protocol, the port number from each slice, an endpoint's first address only; ready endpoints, or
    /// serving-and-terminating ones when none is ready. Sorted and deduplicated.
    private func endpoints(for port: ServicePort, family: IPFamily, slices: [EndpointSlice])
        -> (destinations: [Destination], sawSliceOfFamily: Bool)
    {
        var ready = Set<Destination>()
        var fallback = Set<Destination>()
        var sawSliceOfFamily = false
        for slice in slices where slice.family == family {
            sawSliceOfFamily = true
            guard let number = slice.ports.first(where: { $0.name == port.name && $0.protocol == port.protocol })?.port else {
                continue
            }
            for endpoint in slice.endpoints {
                guard let address = endpoint.addresses.first else { continue }
                if endpoint.isReady { ready.insert(Destination(ip: address, port: number)) }
                else if endpoint.isServingTerminating { fallback.insert(Destination(ip: address, port: number)) }
            }
        }
        return ((ready.isEmpty ? fallback : ready).sorted(), sawSliceOfFamily)
    }

    /// `spec.clusterIPs[i]` pairs with `spec.ipFamilies[i]`; the ClusterIP of a family is the one of that family.
    private func clusterIP(of service: Service, family: IPFamily) -> IPAddress? {
        service.clusterIPs.first { $0.family == family }
    }
}
