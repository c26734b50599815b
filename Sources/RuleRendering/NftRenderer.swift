import NetAddress
import RulePlanning
import ServiceResolution

public enum RenderError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The plan cannot be expressed in nftables (`RulePlan.nftablesRefusal` says why).
    case notExpressibleInNftables(String)

    public var description: String {
        switch self {
        case .notExpressibleInNftables(let why):
            return why
        }
    }
}

/// Renders a plan as an nft script that replaces our table atomically: `nft -f` twice gives the same
/// ruleset. The exact shape is the contract in docs/ruleset.md, shared with the netlink backend.
public enum NftRenderer {

    public static func render(_ plan: RulePlan) throws(RenderError) -> String {
        if let why = plan.nftablesRefusal { throw .notExpressibleInNftables(why) }
        let table = plan.settings.table
        var out = ""
        out.reserveCapacity(512 + plan.rules.count * 200)
        out += "#!/usr/sbin/nft -f\n"
        out += "# hostnet-dnat: \(plan.rules.count) mapping(s), target \(plan.strategy.rawValue).\n"
        out += "# `nft -f` of this file replaces table inet \(table) atomically and touches no other table.\n"
        out += "table inet \(table) {}\n"
        out += "delete table inet \(table)\n"
        out += "table inet \(table) {\n"
        out += "\tcomment \"\(RulePlan.nftOwnershipComment)\"\n"
        for family in IPFamily.allCases {
            out += "\tmap dispatch\(digit(family)) {\n"
            out += "\t\ttype \(addressType(family)) . inet_proto . inet_service : verdict\n"
            elements(plan.rules(family, ranged: false), into: &out) { r in
                let m = r.mapping
                return ["\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) comment \"\(plan.targetChains[r.targetIndex].comment)\" : goto \(plan.nftChain(of: r))"]
            }
            out += "\t}\n"
        }
        // Mappings with loadBalancerSourceRanges: one element per source block; a source outside every block
        // matches nothing and the connection is left alone.
        for family in IPFamily.allCases where plan.hasSourceRanges {
            out += "\tmap ranged\(digit(family)) {\n"
            out += "\t\ttype \(addressType(family)) . inet_proto . inet_service . \(addressType(family)) : verdict\n"
            out += "\t\tflags interval\n"
            elements(plan.rules(family, ranged: true), into: &out) { r in
                let m = r.mapping
                return m.sourceRanges.map { range in
                    "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) . \(range) comment \"\(plan.targetChains[r.targetIndex].comment)\" : goto \(plan.nftChain(of: r))"
                }
            }
            out += "\t}\n"
        }
        out += "\t# Key: external address . protocol . port . endpoint slot; the modulus in typeof is only a type template.\n"
        for family in IPFamily.allCases {
            let fam = family.nftKeyword
            out += "\tmap endpoints\(digit(family)) {\n"
            out += "\t\ttypeof \(fam) daddr . meta l4proto . th dport . numgen random mod 1 : \(fam) daddr . th dport\n"
            elements(plan.rules(family).filter { plan.targetChains[$0.targetIndex].affinityTimeout == nil }, into: &out) { r in
                let m = r.mapping
                return m.target.destinations.enumerated().map { slot, d in
                    "\(m.externalIP) . \(m.protocol.lowercased) . \(m.port) . \(slot) : \(d.ip) . \(d.port)"
                }
            }
            out += "\t}\n"
        }
        if plan.settings.masquerade {
            for family in IPFamily.allCases {
                out += "\tset masquerade\(digit(family)) {\n"
                out += "\t\ttype \(addressType(family))\n"
                let addresses = plan.externalAddresses(family)
                if !addresses.isEmpty {
                    out += "\t\telements = { \(addresses.map(\.description).joined(separator: ", ")) }\n"
                }
                out += "\t}\n"
            }
        }
        for chain in plan.affinityChains {
            for d in chain.target.destinations {
                out += "\tset \(chain.affinityName(d)) {\n"
                out += "\t\ttype \(addressType(chain.family))\n"
                out += "\t\tflags dynamic,timeout\n"
                out += "\t\ttimeout \(chain.affinityTimeout!)s\n"
                out += "\t}\n"
            }
        }
        out += "\tchain output {\n"
        out += "\t\ttype nat hook output priority \(plan.settings.priority); policy accept;\n"
        out += "\t\tip daddr . meta l4proto . th dport vmap @dispatch4\n"
        out += "\t\tip6 daddr . meta l4proto . th dport vmap @dispatch6\n"
        if plan.hasSourceRanges {
            out += "\t\tip daddr . meta l4proto . th dport . ip saddr vmap @ranged4\n"
            out += "\t\tip6 daddr . meta l4proto . th dport . ip6 saddr vmap @ranged6\n"
        }
        out += "\t}\n"
        if plan.settings.masquerade {
            out += "\tchain postrouting {\n"
            out += "\t\ttype nat hook postrouting priority 100; policy accept;\n"
            out += "\t\tct status dnat ct original ip daddr @masquerade4 masquerade\n"
            out += "\t\tct status dnat ct original ip6 daddr @masquerade6 masquerade\n"
            out += "\t}\n"
        }
        for pick in plan.nftPickChains {
            let fam = pick.family.nftKeyword
            out += "\tchain \(pick.name) {\n"
            out += "\t\tmeta l4proto \(pick.protocol.lowercased) dnat \(fam) to \(fam) daddr . meta l4proto . th dport"
            out += " . numgen random mod \(pick.count) map @endpoints\(digit(pick.family))\n"
            out += "\t}\n"
        }
        for chain in plan.affinityChains {
            out += "\tchain \(chain.iptablesName) {\n"
            for line in chain.nftAffinityRules { out += "\t\t\(line)\n" }
            out += "\t}\n"
        }
        out += "}\n"
        return out
    }

    private static func digit(_ f: IPFamily) -> String { f == .ipv4 ? "4" : "6" }
    private static func addressType(_ f: IPFamily) -> String { f == .ipv4 ? "ipv4_addr" : "ipv6_addr" }

    /// An `elements = { … }` block, one element a line, or nothing when there are none.
    private static func elements(_ rules: [PlannedRule], into out: inout String, _ lines: (PlannedRule) -> [String]) {
        var first = true
        for r in rules {
            for line in lines(r) {
                out += first ? "\t\telements = {\n\t\t\t" : ",\n\t\t\t"
                out += line
                first = false
            }
        }
        if !first { out += "\n\t\t}\n" }
    }
}
