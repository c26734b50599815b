import NetlinkBackend
import ServiceResolution

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What `--target auto` sees on the node, and why. Netfilter applies one DNAT per connection, so whether
/// "external IP → ClusterIP" works depends on where kube-proxy translates the ClusterIP: after nat OUTPUT
/// (IPVS) it works; in nat OUTPUT itself (iptables, nftables modes) it never happens. Detection looks at
/// the marks each mode leaves, in this order, and records every fact it used.
public struct ProxyDetection: Sendable {
    public enum Mode: Sendable, Equatable {
        /// `kube-ipvs0` exists: ClusterIPs are bound locally and translated by IPVS after nat OUTPUT.
        case ipvs
        /// kube-proxy's `KUBE-SERVICES` is in the nat table of this iptables variant.
        case iptables(IptablesVariant)
        /// `table ip kube-proxy` / `table ip6 kube-proxy` exists.
        case nftables
        /// None of the above (no kube-proxy, or a replacement such as Cilium's or Calico's eBPF dataplane).
        case unknown
    }

    public let mode: Mode
    /// The facts behind `mode`, e.g. "interface kube-ipvs0 exists", "chain KUBE-SERVICES in iptables-nft nat table".
    public let evidence: [String]
    /// The iptables variant that holds kube-proxy's or kubelet's chains, when one does; the iptables
    /// backend writes there by default.
    public let iptablesVariant: IptablesVariant?

    public init(mode: Mode, evidence: [String], iptablesVariant: IptablesVariant? = nil) {
        self.mode = mode; self.evidence = evidence; self.iptablesVariant = iptablesVariant
    }

    /// Looks at the node: the `kube-ipvs0` interface, nftables tables named `kube-proxy`, and kube-proxy's
    /// chains in both iptables variants. Reads only; needs CAP_NET_ADMIN (CAP_SYS_ADMIN too for `--netns`).
    public static func detect(in context: NodeContext) throws(NodeError) -> ProxyDetection {
        try Capabilities.require(for: "detecting kube-proxy's mode", context: context)
        var evidence: [String] = []

        let ipvs = try interfaceExists("kube-ipvs0", context: context)
        evidence.append(ipvs ? "interface kube-ipvs0 exists (kube-proxy IPVS mode binds service IPs there)"
                             : "no interface kube-ipvs0")

        let netlink = NftablesNetlink(namespace: context.netns)
        var nftTables: [String] = []
        for family in [NftFamily.ip, .ip6, .inet] {
            do {
                if try netlink.tableExists(family: family, name: "kube-proxy") { nftTables.append("table \(family) kube-proxy") }
            } catch {
                if error.kind == .permissionDenied { throw NodeError(netlink: error, action: "detecting kube-proxy's mode") }
                evidence.append("could not look for table \(family) kube-proxy: \(error.description)")
            }
        }
        evidence.append(nftTables.isEmpty ? "no nftables table kube-proxy"
                                          : nftTables.joined(separator: ", ") + " exists (kube-proxy nftables mode)")

        let command = NamespacedCommand(context: context)
        let nft = VariantEvidence.gather(.nft, command: command)
        let legacy = VariantEvidence.gather(.legacy, command: command)
        for e in [nft, legacy] {
            let name = e.variant.displayName
            if !e.installed { evidence.append("\(name) is not installed"); continue }
            for f in e.kubeServicesFamilies {
                evidence.append("chain KUBE-SERVICES in \(f == .ipv4 ? "iptables" : "ip6tables")-\(e.variant.rawValue) nat table")
            }
            evidence += e.kubeletMarkers
            if !e.hasAnyMarker { evidence.append("no KUBE- chains in \(name)") }
            evidence += e.errors
        }
        // Without iptables binaries, iptables-nft's chains can still be seen over netlink.
        var nftNatKubeServices = false
        if !nft.installed {
            if (try? netlink.chainExists(family: .ip, table: "nat", chain: "KUBE-SERVICES")) == true {
                nftNatKubeServices = true
                evidence.append("chain KUBE-SERVICES in nftables table ip nat (iptables-nft, read over netlink)")
            }
        }

        let variant: IptablesVariant?
        switch (nft.hasAnyMarker || nftNatKubeServices, legacy.hasAnyMarker) {
        case (false, false): variant = nil
        default:
            variant = (try? IptablesVariant.choose(nft: nft, legacy: legacy, command: command).0)
                ?? (nftNatKubeServices ? .nft : nil)
        }

        let mode: Mode
        if ipvs {
            // IPVS mode also fills KUBE-SERVICES (for masquerading), so this check comes first.
            mode = .ipvs
        } else if !nftTables.isEmpty {
            // kube-proxy cleans up the other mode's rules when it starts; if iptables leftovers remain, the
            // nftables answer (endpoints) still works under both.
            mode = .nftables
        } else if nft.hasKubeProxy || legacy.hasKubeProxy || nftNatKubeServices {
            let v: IptablesVariant
            if nft.hasKubeProxy && legacy.hasKubeProxy { v = legacy.kubeRuleCount > nft.kubeRuleCount ? .legacy : .nft }
            else { v = legacy.hasKubeProxy ? .legacy : .nft }
            mode = .iptables(v)
        } else {
            mode = .unknown
        }
        return ProxyDetection(mode: mode, evidence: evidence, iptablesVariant: variant)
    }

    /// The target strategy `auto` means on this node, and why:
    /// kube-ipvs0 → cluster-ip; kube-proxy's iptables chains → kube-proxy (iptables backend) or endpoints
    /// (nftables backend, which cannot jump into iptables chains); `table ip kube-proxy` → endpoints;
    /// nothing recognised → endpoints when EndpointSlices are available, else cluster-ip with a warning.
    public func strategy(backend: Backend, haveEndpointSlices: Bool) -> (TargetStrategy, reason: String) {
        switch mode {
        case .ipvs:
            return (.clusterIP, "kube-proxy runs in IPVS mode (interface kube-ipvs0): IPVS translates ClusterIPs after nat "
                    + "OUTPUT, so DNAT to the ClusterIP works and follows endpoint changes by itself")
        case .iptables(let v):
            if backend == .iptables {
                return (.kubeProxy, "kube-proxy runs in iptables mode (\(v.displayName)): the ClusterIP would never be "
                        + "translated after our DNAT, so jump into kube-proxy's KUBE-SVC chain, which stays current by itself")
            }
            return (.endpoints, "kube-proxy runs in iptables mode (\(v.displayName)), and an nftables table cannot jump into "
                    + "its chains: DNAT straight to the endpoints (re-apply when they change, or use --backend iptables "
                    + "for --target kube-proxy)" + (haveEndpointSlices ? "" : "; WARNING: no EndpointSlices in the input, "
                    + "so no service can be mapped"))
        case .nftables:
            return (.endpoints, "kube-proxy runs in nftables mode (table kube-proxy): the ClusterIP would never be translated "
                    + "after our DNAT and its chains cannot be reached from another table, so DNAT straight to the endpoints"
                    + (haveEndpointSlices ? "" : "; WARNING: no EndpointSlices in the input, so no service can be mapped"))
        case .unknown:
            if haveEndpointSlices {
                return (.endpoints, "no kube-proxy mode recognised (no kube-ipvs0, no KUBE-SERVICES chain, no table kube-proxy): "
                        + "DNAT straight to the endpoints, which works whatever translates ClusterIPs")
            }
            return (.clusterIP, "WARNING: no kube-proxy mode recognised and no EndpointSlices in the input: DNAT to the "
                    + "ClusterIP, which only works if something translates ClusterIPs after nat OUTPUT (like IPVS); "
                    + "include EndpointSlices or choose --target")
        }
    }

    /// Whether a network interface exists in the namespace: `if_nametoindex` on a thread inside it.
    static func interfaceExists(_ name: String, context: NodeContext) throws(NodeError) -> Bool {
        guard let ns = context.netns else { return if_nametoindex(name) != 0 }
        do {
            return try ns.run { if_nametoindex(name) != 0 }
        } catch let e as NetlinkError {
            if e.kind == .permissionDenied { throw .noPermissionToEnter("entering \(context.place)", detail: e.message) }
            throw NodeError(netlink: e, action: "entering \(context.place)")
        } catch {
            throw .refused("entering \(context.place): \(error)")
        }
    }
}

extension NodeError {
    /// 77 for permission errors, 69 when nf_tables or nat modules are missing, 64 (usage) when the table name
    /// is taken by a table that is not ours, 1 otherwise.
    public init(netlink e: NetlinkError, action: String? = nil) {
        let prefix = action.map { "\($0): " } ?? ""
        switch e.kind {
        case .foreignTable:
            self.init(exitCode: 64, description: prefix + e.description)
        case .permissionDenied:
            self.init(exitCode: NodeError.noPermissionCode, description: prefix + e.description)
        case .unavailable:
            self.init(exitCode: NodeError.unavailableCode, description: prefix + e.description)
        default:
            let errno = e.errno != 0 && !e.description.contains("errno") ? " (errno \(e.errno))" : ""
            self.init(exitCode: 1, description: prefix + e.description + errno)
        }
    }
}
