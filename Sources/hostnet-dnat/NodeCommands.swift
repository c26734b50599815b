import ArgumentParser
import Foundation
import KubeObjects
import NetlinkBackend
import NodeBackend
import RulePlanning
import RuleRendering
import ServiceResolution
import Orchestration

extension Backend: ExpressibleByArgument {}
extension IptablesVariant: ExpressibleByArgument {}

enum OutputFormat: String, ExpressibleByArgument, CaseIterable { case text, json }

/// Where on the node rules go.
struct NodeFlags: ParsableArguments {
    @Option(help: ArgumentHelp("Act in this network namespace: a name under /run/netns or a path such as /proc/PID/ns/net.", valueName: "name|path"))
    var netns: String?

    @Option(help: ArgumentHelp("nftables (over netlink, atomic) or iptables (iptables-restore, into kube-proxy's variant).", valueName: "backend"))
    var backend: Backend = .nftables

    @Option(help: ArgumentHelp("With --backend iptables: legacy or nft (default: the variant that holds kube-proxy's chains).", valueName: "variant"))
    var iptables: IptablesVariant?

    @Option(help: ArgumentHelp("text, or json for scripts (quiet on stderr).", valueName: "format"))
    var output: OutputFormat = .text

    /// `detection`: what `--target auto` found, so the iptables backend writes to the variant it saw.
    func applier(detection: ProxyDetection? = nil) throws(CLIError) -> NodeApplier {
        NodeApplier(context: NodeContext(netns: try namespace()), backend: backend, iptablesVariant: iptables, detection: detection)
    }

    func namespace() throws(CLIError) -> NetworkNamespace? {
        guard let netns else { return nil }
        let ns: NetworkNamespace
        do { ns = try NetworkNamespace.parse(netns) } catch { throw CLIError(.usage, "--netns: \(error.description)") }
        guard FileManager.default.fileExists(atPath: ns.path) else {
            throw CLIError(.usage, "--netns \(netns): no such network namespace (\(ns.path) does not exist)")
        }
        if let why = notANetworkNamespace(ns.path) { throw CLIError(.usage, "--netns \(netns): \(ns.path) \(why)") }
        return ns
    }

    /// Asks the kernel what `path` is (NS_GET_NSTYPE), so a wrong file is a usage error, not a kernel refusal.
    private func notANetworkNamespace(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }  // unreadable: let setns say why, with its permission message
        defer { close(fd) }
        let nsGetNSType: UInt = 0xB703  // _IO(0xb7, 0x3)
        let type = ioctl(fd, nsGetNSType)
        if type < 0 { return "is not a namespace file (such as /proc/PID/ns/net or /run/netns/NAME)" }
        if type != 0x4000_0000 { return "is not a network namespace" }  // CLONE_NEWNET
        return nil
    }
}

extension NodeError {
    var cliError: CLIError { CLIError(code: exitCode, description) }
}

/// Loads the input, decides what `auto` means on this node, and plans (Orchestration.Planning).
struct NodePlanning {
    let plan: RulePlan
    let strategy: TargetStrategy
    let reason: String?
    let detection: ProxyDetection?
    /// The input is an explicit empty List (see `ClusterObjects.declaresNoServices`).
    let inputDeclaresNoServices: Bool

    static func make(source: SourceOptions, resolution: ResolutionFlags, planFlags: PlanFlags, node: NodeFlags) async throws(CLIError) -> NodePlanning {
        let settings = try planFlags.settings(onConflict: resolution.onConflict)
        let options = try resolution.resolutionOptions()
        let context = NodeContext(netns: try node.namespace())
        let objects = try await Pipeline.loadObjects(source, namespaces: resolution.namespaces, selector: try resolution.serverSelector())
        let planned: Planning.NodePlan
        do {
            planned = try Planning.planForNode(objects, options: options, settings: settings, backend: node.backend, context: context)
        } catch { throw CLIError(error) }
        return NodePlanning(plan: planned.plan, strategy: planned.target.strategy, reason: planned.target.reason,
                            detection: planned.target.detection, inputDeclaresNoServices: objects.declaresNoServices)
    }

    func announce(_ output: OutputFormat) {
        guard output == .text else { return }
        if let reason { Console.note("target auto: picked \(strategy.rawValue): \(reason)") }
        for w in plan.warnings { Console.warning(w.message) }
    }
}

struct Apply: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Install the rules in the kernel, atomically (needs CAP_NET_ADMIN).",
        discussion: """
        The whole ruleset is replaced in one transaction: the kernel holds either the previous rules or the \
        new ones, never a mix, and applying the same input twice changes nothing. No other table or chain \
        (kube-proxy's, Docker's) is touched. With --target auto (the default) the node is inspected: \
        kube-ipvs0 means IPVS (cluster-ip); kube-proxy's iptables chains mean kube-proxy (iptables backend) \
        or endpoints (nftables backend); table ip kube-proxy means endpoints.

        Examples:
          hostnet-dnat apply -f cluster.json
          hostnet-dnat apply -f cluster.json --backend iptables
          hostnet-dnat apply -f cluster.json --dry-run
          hostnet-dnat apply                     # in a pod: reads the API with its service account
          hostnet-dnat apply -f cluster.json --netns /proc/1234/ns/net --output json
        """)

    @OptionGroup(title: "Input") var source: SourceOptions
    @OptionGroup(title: "Selection") var resolution: ResolutionFlags
    @OptionGroup(title: "Rules") var planFlags: PlanFlags
    @OptionGroup(title: "Node") var node: NodeFlags

    @Flag(help: "Show what would change; touch nothing.")
    var dryRun = false

    @Flag(help: "Remove every installed mapping when the input yields none (otherwise only an explicit empty List may).")
    var allowEmpty = false

    func run() async throws {
        try await Console.run {
            let planning = try await NodePlanning.make(source: source, resolution: resolution, planFlags: planFlags, node: node)
            planning.announce(node.output)
            let applier = try node.applier(detection: planning.detection)
            let result: ApplyResult
            do {
                // One owner at a time: a running `sync` owns the rules (exit 75 at once); another apply is waited for.
                let lock = dryRun ? nil : try NodeLock.acquire(.apply, context: NodeContext(netns: try node.namespace()))
                defer { withExtendedLifetime(lock) {} }
                if planning.plan.rules.isEmpty, !allowEmpty, !planning.inputDeclaresNoServices {
                    // A wrong file, a typo in --namespace or -l: don't take every DNAT off the node on its word.
                    let installed = try applier.status(planning.plan.settings).mappings.count
                    if installed > 0 {
                        throw CLIError(.dataError, "refusing to remove all \(installed) installed mapping(s): the input yields no mapping and is not an empty List (kind: List, items: []); pass --allow-empty to remove them")
                    }
                }
                result = try applier.apply(planning.plan, dryRun: dryRun)
            } catch let e as NodeError { throw e.cliError }
            do throws(CLIError) {
                try report(result, planning)
            } catch {
                // The kernel already holds the result; say so, so the caller does not take 74 for "nothing done".
                throw CLIError(.ioError, "\(dryRun ? "dry run" : "applied"): \(result.summary); but \(error.message)")
            }
        }
    }

    func report(_ result: ApplyResult, _ planning: NodePlanning) throws(CLIError) {
        switch node.output {
        case .json:
            let w = JSONWriter()
            w.object {
                w.key("changed"); w.bool(result.changed)
                w.key("dryRun"); w.bool(dryRun)
                w.key("target"); w.string(planning.strategy.rawValue)
                if let r = planning.reason { w.key("targetReason"); w.string(r) }
                w.key("mappings"); w.number(planning.plan.rules.count)
                w.key("skipped"); w.number(planning.plan.skipped.count)
                w.key("differences"); w.array(result.differences) { w.string($0) }
                w.key("warnings"); w.array(result.warnings) { w.string($0) }
                w.key("summary"); w.string(result.summary)
            }
            try Console.out(w.output + "\n")
        case .text:
            if dryRun { for d in result.differences { try Console.out(d + "\n") } }
            for w in result.warnings { Console.warning(w) }
            Console.note((dryRun ? "dry run: " : "") + result.summary)
        }
    }
}

struct Diff: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare the rules the input asks for with what the kernel holds; exit 0 when equal, 1 when they differ.",
        discussion: """
        Examples:
          hostnet-dnat diff -f cluster.json
          hostnet-dnat diff -f cluster.json --backend iptables --output json
        """)

    @OptionGroup(title: "Input") var source: SourceOptions
    @OptionGroup(title: "Selection") var resolution: ResolutionFlags
    @OptionGroup(title: "Rules") var planFlags: PlanFlags
    @OptionGroup(title: "Node") var node: NodeFlags

    func run() async throws {
        try await Console.run {
            let planning = try await NodePlanning.make(source: source, resolution: resolution, planFlags: planFlags, node: node)
            planning.announce(node.output)
            let differences: [String]
            do { differences = try node.applier(detection: planning.detection).diff(planning.plan) } catch let e as NodeError { throw e.cliError }
            switch node.output {
            case .json:
                let w = JSONWriter()
                w.object {
                    w.key("same"); w.bool(differences.isEmpty)
                    w.key("differences"); w.array(differences) { w.string($0) }
                }
                try Console.out(w.output + "\n")
            case .text:
                for d in differences { try Console.out(d + "\n") }
                Console.note(differences.isEmpty ? "the kernel matches the input" : "\(differences.count) difference(s)")
            }
            if !differences.isEmpty { throw ExitCode(ExitStatus.differs.rawValue) }
        }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what the kernel holds now, read back over netlink (or iptables-save for --backend iptables).",
        discussion: """
        Examples:
          hostnet-dnat status
          hostnet-dnat status --output json | jq '.mappings | length'
          hostnet-dnat status --backend iptables --netns node1
        """)

    @OptionGroup(title: "Rules") var planFlags: PlanFlags
    @OptionGroup(title: "Node") var node: NodeFlags

    func run() async throws {
        try await Console.run {
            let settings = try planFlags.settings(onConflict: .fail)
            let status: NodeStatus
            do { status = try node.applier().status(settings) } catch let e as NodeError { throw e.cliError }
            try Console.out(node.output == .json ? status.json : status.text)
        }
    }
}

struct Remove: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take out our table (nftables) or our chains and jumps (iptables); nothing else.",
        discussion: """
        Examples:
          hostnet-dnat remove
          hostnet-dnat remove --backend iptables
        """)

    @OptionGroup(title: "Rules") var planFlags: PlanFlags
    @OptionGroup(title: "Node") var node: NodeFlags

    func run() async throws {
        try await Console.run {
            let settings = try planFlags.settings(onConflict: .fail)
            let removed: Bool
            do {
                let lock = try NodeLock.acquire(.remove, context: NodeContext(netns: try node.namespace()))
                defer { withExtendedLifetime(lock) {} }
                removed = try node.applier().remove(settings)
            } catch let e as NodeError { throw e.cliError }
            if node.output == .json {
                try Console.out("{\n  \"removed\": \(removed)\n}\n")
            } else {
                Console.note(removed ? "removed" : "nothing of ours was installed")
            }
        }
    }
}
