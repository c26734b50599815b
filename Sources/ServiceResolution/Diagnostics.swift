import KubeObjects

/// Why a service, port or address was not mapped: one case per rule of kube-proxy's (or ours) that
/// leaves something out. The raw value is the stable, machine-readable code: the `code` field of
/// `--format json`'s `skipped`, and the `reason` label of the agent's `hostnet_dnat_skipped` metric.
/// The sentence people read stays in `SkippedItem.reason`.
public enum SkipReason: String, Sendable, Hashable, CaseIterable, Comparable, Codable {
    case filteredByNamespace = "filtered_namespace"
    case filteredBySelector = "filtered_selector"
    /// Labelled `service.kubernetes.io/service-proxy-name` for another proxy (or, with
    /// `--service-proxy-name`, not labelled for that one).
    case otherProxy = "service_proxy_name"
    /// Labelled `service.kubernetes.io/headless`.
    case headlessLabel = "headless_label"
    case externalName = "external_name"
    case headless = "headless"
    case hostnameOnlyIngress = "hostname_only_ingress"
    case proxyMode = "ip_mode_proxy"
    case externalIPNotAllowed = "external_ip_not_allowed"
    case externalIPOutsideAllowlist = "external_ip_outside_allowlist"
    case noExternalIP = "no_external_ip"
    case noPorts = "no_ports"
    case familyMismatch = "family_mismatch"
    case noClusterIP = "no_cluster_ip"
    case noReadyEndpoints = "no_ready_endpoints"
    case noEndpointSlicesOfFamily = "no_endpoint_slices_of_family"
    case conflict = "conflict"
    /// An object the agent could not decode; its last good copy (if any) is what is planned.
    case invalidObject = "invalid_object"

    public static func < (a: SkipReason, b: SkipReason) -> Bool { a.rawValue < b.rawValue }
}

/// Something a user should know although nothing failed. A value, so the CLI prints `message` as a
/// sentence and the agent logs it (once) and counts it by `code`.
public struct Diagnostic: Sendable, Hashable, CustomStringConvertible {
    public enum Severity: String, Sendable, Hashable, Comparable {
        case info, warning, error
        public static func < (a: Severity, b: Severity) -> Bool {
            let order: [Severity] = [.info, .warning, .error]
            return order.firstIndex(of: a)! < order.firstIndex(of: b)!
        }
    }

    /// Stable machine-readable codes (log field `code`).
    public enum Code: String, Sendable, Hashable {
        case duplicateObject = "duplicate_object"
        /// A `loadBalancerSourceRanges` entry (or annotation entry) that is not a CIDR: ignored, as kube-proxy does.
        case invalidSourceRange = "invalid_source_range"
        case autoFellBackToClusterIP = "auto_fell_back_to_cluster_ip"
        case ignoredKinds = "ignored_kinds"
        case conflict = "conflict"
        case invalidObject = "invalid_object"
    }

    public var severity: Severity
    public var code: Code
    /// The service it is about, when there is one.
    public var service: ObjectName?
    public var message: String

    public init(_ severity: Severity, _ code: Code, service: ObjectName? = nil, _ message: String) {
        self.severity = severity; self.code = code; self.service = service; self.message = message
    }

    public var description: String { message }
}
