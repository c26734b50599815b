import ArgumentParser
import KubeObjects
import NetAddress
import Orchestration
import RulePlanning
import ServiceResolution

extension TargetStrategy: ExpressibleByArgument {}
extension ConflictPolicy: ExpressibleByArgument {}

/// Where Services and EndpointSlices come from.
struct SourceOptions: ParsableArguments {
    @Option(name: [.short, .customLong("filename")], parsing: .singleValue,
            help: ArgumentHelp("A file of Services and EndpointSlices (JSON or YAML: a List, typed lists, single objects, multi-document YAML); '-' reads stdin. Repeatable. Without -f, objects are read from the Kubernetes API.", valueName: "file"))
    var filenames: [String] = []

    @Option(help: ArgumentHelp("kubeconfig file when reading from the API (default: $KUBECONFIG, then ~/.kube/config).", valueName: "path"))
    var kubeconfig: String?

    @Option(help: ArgumentHelp("kubeconfig context to use.", valueName: "name"))
    var context: String?

    @Option(help: ArgumentHelp("Refuse an input file larger than this (bytes; default 1 GiB, room for about 100,000 Services of `kubectl -o json`).", valueName: "bytes"))
    var maxInputBytes: Int = InputReader.defaultLimit

    func validate() throws {
        guard maxInputBytes > 0 else { throw ValidationError("--max-input-bytes must be positive") }
    }
}

/// Which services become which mappings.
struct ResolutionFlags: ParsableArguments {
    @Option(name: .customLong("namespace"), parsing: .singleValue,
            help: ArgumentHelp("Only services in this namespace. Repeatable.", valueName: "ns"))
    var namespaces: [String] = []

    @Option(name: [.customShort("l"), .customLong("selector")],
            help: ArgumentHelp("Label selector for services: a=b, a!=b, a in (x,y), a notin (x), a, !a.", valueName: "selector"))
    var selector: String?

    @Option(help: ArgumentHelp("Where translated connections go: auto, endpoints, cluster-ip or kube-proxy.", valueName: "strategy"))
    var target: TargetStrategy = .auto

    @Option(name: .customLong("external-ip-cidr"), parsing: .singleValue,
            help: ArgumentHelp("Honour spec.externalIPs inside this CIDR (CVE-2020-8554: any user who can create a Service can set them). Repeatable; without it externalIPs are skipped.", valueName: "cidr"))
    var externalIPCIDRs: [String] = []

    @Flag(help: "Also map load-balancer ingress IPs with ipMode: Proxy (kube-proxy leaves them to the load balancer).")
    var includeProxyMode = false

    @Option(help: ArgumentHelp("Map the Services of this alternative proxy (labelled service.kubernetes.io/service-proxy-name=NAME) instead of kube-proxy's.", valueName: "name"))
    var serviceProxyName: String?

    @Option(help: ArgumentHelp("Two services on the same external IP, protocol and port: fail (exit 65) or skip both.", valueName: "fail|skip"))
    var onConflict: ConflictPolicy = .fail

    /// The label selector Services are listed (and watched) with on the server: the user's `-l` and the
    /// proxy selection (`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`, as
    /// kube-proxy lists), so that other proxies' Services never travel. Resolution checks the labels again.
    func serverSelector() throws(CLIError) -> String {
        let proxy = try resolutionOptions().proxySelector
        return [selector, proxy].compactMap { $0 }.joined(separator: ",")
    }

    func resolutionOptions() throws(CLIError) -> ResolutionOptions {
        var cidrs: [CIDR] = []
        for text in externalIPCIDRs {
            guard let c = CIDR(text) else {
                throw CLIError(.usage, "--external-ip-cidr \"\(text)\" is not a CIDR such as 203.0.113.0/24 or 2001:db8::/64")
            }
            cidrs.append(c)
        }
        var labelSelector: LabelSelector? = nil
        if let selector {
            do { labelSelector = try LabelSelector(selector) } catch { throw CLIError(.usage, "-l/--selector: \(error.message)") }
        }
        if let name = serviceProxyName {
            let ok = (1...63).contains(name.utf8.count) && name.utf8.allSatisfy {
                ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2D || $0 == 0x5F || $0 == 0x2E
            }
            guard ok else {
                throw CLIError(.usage, "--service-proxy-name \"\(name)\" is not a label value (1-63 letters, digits, '-', '_' or '.')")
            }
        }
        return ResolutionOptions(target: target, externalIPAllowlist: cidrs, includeProxyMode: includeProxyMode,
                                 namespaces: Set(namespaces), selector: labelSelector, serviceProxyName: serviceProxyName)
    }
}

/// Names and knobs of the rules themselves.
struct PlanFlags: ParsableArguments {
    @Flag(help: "Do not masquerade translated connections (by default they are, so replies come back even when the node's source address is the external IP itself).")
    var noMasquerade = false

    @Option(help: ArgumentHelp("nftables table name (table inet <name>).", valueName: "name"))
    var table = "hostnet-dnat"

    @Option(help: ArgumentHelp("iptables chain that OUTPUT jumps to (<chain>-MASQ masquerades).", valueName: "name"))
    var chain = "HOSTNET-DNAT"

    // .unconditional: `--priority -101` (a negative number is not an option name).
    @Option(parsing: .unconditional, help: ArgumentHelp("Priority of the nat output chain. -99 runs after kube-proxy (-100): only what nothing else translated. -101 takes over. For iptables: below -100 inserts the jump first in OUTPUT, otherwise appends it.", valueName: "n"))
    var priority = -99

    /// Validated first thing in every command, so a bad name is a usage error (64) before anything else runs.
    func settings(onConflict: ConflictPolicy) throws(CLIError) -> PlanSettings {
        if priority <= -200 {
            // NF_IP_PRI_CONNTRACK: the kernel refuses nat chains at or before conntrack.
            throw CLIError(.usage, "--priority \(priority): a nat chain needs a priority above -200 (where conntrack runs); the kernel refuses it")
        }
        let s = PlanSettings(table: table, chain: chain, priority: priority, masquerade: !noMasquerade, onConflict: onConflict)
        do { try Planner.validate(s) } catch { throw CLIError(.usage, error.description) }
        return s
    }
}

struct CLIError: Error, CustomStringConvertible {
    let status: Int32
    let message: String
    init(_ status: ExitStatus, _ message: String) { self.status = status.rawValue; self.message = message }
    init(code: Int32, _ message: String) { self.status = code; self.message = message }
    init(_ e: PipelineError) { self.status = e.exitCode; self.message = e.message }
    var description: String { message }
}
