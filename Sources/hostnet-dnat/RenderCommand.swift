import ArgumentParser
import Foundation
import NetAddress
import RulePlanning
import RuleRendering
import ServiceResolution

enum RenderFormat: String, ExpressibleByArgument, CaseIterable {
    case nft, iptables, ip6tables, json
}

struct Render: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the rules for review: an nft script, iptables-restore text, or JSON.",
        discussion: """
        Nothing on the node is read or changed. With --target auto (the default) there is no node to look \
        at: services with EndpointSlices in the input are sent to their endpoints, the others to their \
        ClusterIP (with a warning, because under kube-proxy's iptables or nftables mode that ClusterIP is \
        never translated).

        Examples:
          kubectl get services,endpointslices -A -o json > cluster.json
          hostnet-dnat render -f cluster.json --format nft > hostnet-dnat.nft
          hostnet-dnat render -f cluster.json --format iptables > rules.v4
          hostnet-dnat render -f cluster.json --format ip6tables > rules.v6
          hostnet-dnat render -f cluster.json --format json | jq .
          kubectl get svc -A -o yaml | hostnet-dnat render -f - --target cluster-ip
          hostnet-dnat render --kubeconfig ~/.kube/config --context prod --format nft
        """)

    @OptionGroup(title: "Input") var source: SourceOptions
    @OptionGroup(title: "Selection") var resolution: ResolutionFlags
    @OptionGroup(title: "Rules") var planFlags: PlanFlags

    @Option(help: ArgumentHelp("nft, iptables, ip6tables or json.", valueName: "format"))
    var format: RenderFormat = .nft

    @Option(name: [.short, .customLong("output")], help: ArgumentHelp("Write to this file instead of stdout (written only when everything succeeded).", valueName: "file"))
    var outputFile: String?

    func run() async throws {
        try await Console.run {
            let settings = try planFlags.settings(onConflict: resolution.onConflict)
            let options = try resolution.resolutionOptions()
            let objects = try await Pipeline.loadObjects(source, namespaces: resolution.namespaces, selector: try resolution.serverSelector())
            let plan = try Pipeline.plan(objects: objects, resolution: options, settings: settings)
            let text: String
            switch format {
            case .nft:
                do { text = try NftRenderer.render(plan) } catch { throw CLIError(.usage, "\(error)") }
            case .iptables: text = IptablesRenderer.render(plan, family: .ipv4)
            case .ip6tables: text = IptablesRenderer.render(plan, family: .ipv6)
            case .json: text = JSONRenderer.render(plan)
            }
            if format != .json {
                for w in plan.warnings { Console.warning(w.message) }
            }
            if let outputFile {
                // Write beside the target and rename, so a failure never leaves a half-written rule file.
                let tmp = outputFile + ".tmp-\(getpid())"
                guard FileManager.default.createFile(atPath: tmp, contents: Data(text.utf8)) else {
                    throw CLIError(.cantCreate, "\(outputFile): cannot write")
                }
                if rename(tmp, outputFile) != 0 {
                    unlink(tmp)
                    throw CLIError(.cantCreate, "\(outputFile): cannot write (\(String(cString: strerror(errno))))")
                }
            } else {
                Console.out(text)
            }
            if format != .json {
                let family: IPFamily? = format == .iptables ? .ipv4 : (format == .ip6tables ? .ipv6 : nil)
                let count = family.map { plan.rules($0).count } ?? plan.rules.count
                Console.note(summary(plan, mapped: count, objects: objects.services.count))
            }
        }
    }

    func summary(_ plan: RulePlan, mapped: Int, objects: Int) -> String {
        let skippedServices = Set(plan.skipped.map(\.service)).count
        return "\(mapped) mapping(s) from \(objects) service(s); \(skippedServices) service(s) with skipped items"
            + (plan.skipped.isEmpty ? "" : " (see --format json for reasons)")
    }
}
