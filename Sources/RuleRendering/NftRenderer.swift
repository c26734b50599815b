import NetAddress
import RulePlanning
import ServiceResolution

public enum RenderError: Error, Sendable, Equatable, CustomStringConvertible {
    case kubeProxyTargetNeedsIptables(family: String)

    public var description: String {
        switch self {
        case .kubeProxyTargetNeedsIptables(let family):
            return "--target kube-proxy jumps into kube-proxy's iptables KUBE-SVC-… chains, which an nftables table "
                + "cannot reach; use --format \(family) (or --backend iptables), or --target endpoints"
        }
    }
}

/// Renders a plan as an nft script that replaces our table atomically: `nft -f` twice gives the same
/// ruleset. The exact shape is the contract in docs/ruleset.md, shared with the netlink backend.
public enum NftRenderer {
    public static func render(_ plan: RulePlan) throws(RenderError) -> String {
        if plan.targetChains.contains(where: { if case .kubeProxyChain = $0.target { return true } else { return false } }) {
            throw .kubeProxyTargetNeedsIptables(family: "iptables")
        }
        let table = plan.settings.table
        var out = ""
        out.reserveCapacity(256 + plan.rules.count * 160)
        out += "#!/usr/sbin/nft -f\n"
        out += "# hostnet-dnat: \(plan.rules.count) mapping(s) in \(plan.targetChains.count) target chain(s), target \(plan.strategy.rawValue).\n"
        out += "# `nft -f` of this file replaces table inet \(table) atomically and touches no other table.\n"
        out += "table inet \(table) {}\n"
        out += "delete table inet \(table)\n"
        out += "table inet \(table) {\n"
        for family in IPFamily.allCases {
            let d = family == .ipv4 ? "4" : "6"
            out += "\tmap dispatch\(d) {\n"
            out += "\t\ttype \(family == .ipv4 ? "ipv4_addr" : "ipv6_addr") . inet_proto . inet_service : verdict\n"
            let rules = plan.rules(family)
            if !rules.isEmpty {
                out += "\t\telements = {\n"
                for (i, r) in rules.enumerated() {
                    let m = r.mapping
                    out += "\t\t\t\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) : goto \(plan.targetChains[r.targetIndex].nftName)"
                    out += i == rules.count - 1 ? "\n" : ",\n"
                }
                out += "\t\t}\n"
            }
            out += "\t}\n"
        }
        if plan.settings.masquerade {
            for family in IPFamily.allCases {
                let d = family == .ipv4 ? "4" : "6"
                out += "\tset masquerade\(d) {\n"
                out += "\t\ttype \(family == .ipv4 ? "ipv4_addr" : "ipv6_addr")\n"
                let addresses = plan.externalAddresses(family)
                if !addresses.isEmpty {
                    out += "\t\telements = { \(addresses.map(\.description).joined(separator: ", ")) }\n"
                }
                out += "\t}\n"
            }
        }
        out += "\tchain output {\n"
        out += "\t\ttype nat hook output priority \(plan.settings.priority); policy accept;\n"
        out += "\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n"
        out += "\t\tip6 daddr . meta l4proto . th dport vmap @dispatch6\n"
        out += "\t}\n"
        if plan.settings.masquerade {
            out += "\tchain postrouting {\n"
            out += "\t\ttype nat hook postrouting priority 100; policy accept;\n"
            out += "\t\tct status dnat ct original ip daddr @masquerade4 masquerade\n"
            out += "\t\tct status dnat ct original ip6 daddr @masquerade6 masquerade\n"
            out += "\t}\n"
        }
        for chain in plan.targetChains {
            out += "\tchain \(chain.nftName) {\n"
            out += "\t\t\(targetRule(chain))\n"
            out += "\t}\n"
        }
        out += "}\n"
        return out
    }

    /// The single rule of a target chain, as nft lists it.
    public static func targetRule(_ chain: TargetChain) -> String {
        let fam = chain.family.nftKeyword
        let destinations = chain.target.destinations
        var rule = "meta l4proto \(chain.protocol.lowercased) dnat \(fam) to "
        if destinations.count == 1 {
            rule += destinations[0].description
        } else {
            let entries = destinations.enumerated().map { "\($0) : \($1.ip) . \($1.port)" }
            rule += "numgen random mod \(destinations.count) map { \(entries.joined(separator: ", ")) }"
        }
        rule += " comment \"\(chain.comment)\""
        return rule
    }
}
