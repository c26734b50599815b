import NetAddress

/// `namespace/name`, the way kubectl and kube-proxy name an object in messages.
public struct ObjectName: Sendable, Hashable, Comparable, CustomStringConvertible {
    public let namespace: String
    public let name: String
    public init(namespace: String, name: String) { self.namespace = namespace; self.name = name }
    public var description: String { "\(namespace)/\(name)" }
    public static func < (a: ObjectName, b: ObjectName) -> Bool {
        (a.namespace, a.name) < (b.namespace, b.name)
    }
}

/// The parts of a `v1/Service` that decide where its external addresses should lead.
public struct Service: Sendable, Equatable {
    public var id: ObjectName
    public var labels: [String: String]
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalName`.
    public var type: String
    /// `spec.clusterIPs` (or `[spec.clusterIP]`), parsed; empty when headless or unset.
    public var clusterIPs: [IPAddress]
    /// True for `clusterIP: None`.
    public var headless: Bool
    public var ipFamilies: [IPFamily]
    public var ports: [ServicePort]
    public var externalIPs: [IPAddress]
    public var loadBalancerIngress: [LoadBalancerIngress]
    public var sessionAffinity: String?
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` (1…86400, as the API validates it); nil when
    /// unset, which means 10800 for `sessionAffinity: ClientIP`.
    public var sessionAffinityTimeoutSeconds: Int?
    /// `spec.loadBalancerSourceRanges` as written (kube-proxy trims and parses them itself, and ignores
    /// entries that are not CIDRs; resolution does the same and reports them).
    public var loadBalancerSourceRanges: [String]
    /// The annotation `service.beta.kubernetes.io/load-balancer-source-ranges` as written (comma-separated):
    /// cloud load balancers honour it when `spec.loadBalancerSourceRanges` is empty. nil when absent.
    public var loadBalancerSourceRangesAnnotation: String?

    public init(id: ObjectName, labels: [String: String] = [:], type: String = "ClusterIP",
                clusterIPs: [IPAddress] = [], headless: Bool = false, ipFamilies: [IPFamily] = [],
                ports: [ServicePort] = [], externalIPs: [IPAddress] = [],
                loadBalancerIngress: [LoadBalancerIngress] = [], sessionAffinity: String? = nil,
                sessionAffinityTimeoutSeconds: Int? = nil, loadBalancerSourceRanges: [String] = [],
                loadBalancerSourceRangesAnnotation: String? = nil) {
        self.id = id; self.labels = labels; self.type = type; self.clusterIPs = clusterIPs
        self.headless = headless; self.ipFamilies = ipFamilies; self.ports = ports
        self.externalIPs = externalIPs; self.loadBalancerIngress = loadBalancerIngress
        self.sessionAffinity = sessionAffinity; self.sessionAffinityTimeoutSeconds = sessionAffinityTimeoutSeconds
        self.loadBalancerSourceRanges = loadBalancerSourceRanges
        self.loadBalancerSourceRangesAnnotation = loadBalancerSourceRangesAnnotation
    }

    /// The annotation cloud load balancers read for source ranges.
    public static let sourceRangesAnnotation = "service.beta.kubernetes.io/load-balancer-source-ranges"
    /// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
    public static let defaultAffinityTimeoutSeconds = 10800
    /// The API's upper bound for `timeoutSeconds` (one day).
    public static let maxAffinityTimeoutSeconds = 86400
}

public struct ServicePort: Sendable, Equatable {
    /// Empty for the single unnamed port a Service may have.
    public var name: String
    public var `protocol`: TransportProtocol
    public var port: Int
    /// `targetPort` as written: a number or a container port name.
    public var targetPort: String?

    public init(name: String = "", protocol: TransportProtocol = .tcp, port: Int, targetPort: String? = nil) {
        self.name = name; self.protocol = `protocol`; self.port = port; self.targetPort = targetPort
    }
}

public struct LoadBalancerIngress: Sendable, Equatable {
    public var ip: IPAddress?
    public var hostname: String?
    /// `VIP`, `Proxy`, or nil (which means VIP).
    public var ipMode: String?
    public init(ip: IPAddress? = nil, hostname: String? = nil, ipMode: String? = nil) {
        self.ip = ip; self.hostname = hostname; self.ipMode = ipMode
    }
}

/// The parts of a `discovery.k8s.io/v1` EndpointSlice that say where a Service is really served.
public struct EndpointSlice: Sendable, Equatable {
    public var id: ObjectName
    /// The `kubernetes.io/service-name` label; slices without it belong to no Service.
    public var serviceName: String?
    /// `IPv4`, `IPv6` or `FQDN` (FQDN slices are never used: they carry no address).
    public var addressType: String
    public var ports: [EndpointPort]
    public var endpoints: [Endpoint]
    /// The annotation `endpoints.kubernetes.io/last-change-trigger-time` as written (RFC 3339): when the change
    /// that produced this version of the slice happened. kube-proxy's network-programming latency is "rules
    /// in place" minus this. Kept raw: parsing it is the consumer's business, and a bad value must not make
    /// the slice unusable.
    public var lastChangeTriggerTime: String?

    public init(id: ObjectName, serviceName: String?, addressType: String, ports: [EndpointPort], endpoints: [Endpoint],
                lastChangeTriggerTime: String? = nil) {
        self.id = id; self.serviceName = serviceName; self.addressType = addressType
        self.ports = ports; self.endpoints = endpoints; self.lastChangeTriggerTime = lastChangeTriggerTime
    }

    public var family: IPFamily? {
        switch addressType {
        case "IPv4": return .ipv4
        case "IPv6": return .ipv6
        default: return nil
        }
    }
}

public struct EndpointPort: Sendable, Equatable {
    public var name: String
    public var port: Int?
    public var `protocol`: TransportProtocol
    public init(name: String = "", port: Int?, protocol: TransportProtocol = .tcp) {
        self.name = name; self.port = port; self.protocol = `protocol`
    }
}

public struct Endpoint: Sendable, Equatable {
    public var addresses: [IPAddress]
    /// nil means ready, as the API documents.
    public var ready: Bool?
    public var serving: Bool?
    public var terminating: Bool?
    public init(addresses: [IPAddress], ready: Bool? = nil, serving: Bool? = nil, terminating: Bool? = nil) {
        self.addresses = addresses; self.ready = ready; self.serving = serving; self.terminating = terminating
    }
    public var isReady: Bool { ready ?? true }
    /// kube-proxy's fallback when nothing is ready: serving (nil means true, as kube-proxy reads it) and terminating.
    public var isServingTerminating: Bool { (serving ?? true) && (terminating ?? false) }
}

/// Everything read from the sources, plus what was passed over.
public struct ClusterObjects: Sendable, Equatable {
    public var services: [Service] = []
    public var endpointSlices: [EndpointSlice] = []
    /// Objects of other kinds, counted by kind ("ConfigMap": 3).
    public var ignoredKinds: [String: Int] = [:]
    /// Documents read (a JSON file is one; each non-empty YAML document is one; each API list page is one).
    /// Zero means the input held nothing at all, which is what a failed `kubectl get … > file` leaves.
    public var documents = 0
    /// The input held an explicit empty list (`kind: List` or a typed list such as `ServiceList` with
    /// `items: []`, or an API list with no items): the one way kubectl says "there are no objects".
    public var sawEmptyList = false
    public init() {}

    /// True when the input says, in so many words, that there are no Services: an empty List and no
    /// Service anywhere. Anything else that yields no mappings may be a mistake (a wrong file, a typo in a
    /// filter), so removing every installed mapping on its strength needs `--allow-empty`.
    public var declaresNoServices: Bool { services.isEmpty && sawEmptyList }

    /// The same objects and the same declaration of emptiness, however many documents or pages they came in.
    public static func == (a: ClusterObjects, b: ClusterObjects) -> Bool {
        a.services == b.services && a.endpointSlices == b.endpointSlices && a.ignoredKinds == b.ignoredKinds
            && a.sawEmptyList == b.sawEmptyList
    }

    public mutating func merge(_ other: ClusterObjects) {
        // Into an empty side, take the other's arrays as they are: appending copied (and retained) every
        // object of a 10k-Service file once more.
        if services.isEmpty { services = other.services } else { services += other.services }
        if endpointSlices.isEmpty { endpointSlices = other.endpointSlices } else { endpointSlices += other.endpointSlices }
        for (k, v) in other.ignoredKinds { ignoredKinds[k, default: 0] += v }
        documents += other.documents
        sawEmptyList = sawEmptyList || other.sawEmptyList
    }
}
