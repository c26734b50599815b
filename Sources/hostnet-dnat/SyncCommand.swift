import AgentOperations
import ArgumentParser
import Foundation
import KubernetesAPI
import Logging
import NodeBackend
import Orchestration
import RulePlanning
import ServiceLifecycle
import ServiceResolution

struct DurationArgument: ExpressibleByArgument, Sendable {
    let duration: Duration
    let text: String
    init?(argument: String) {
        guard let d = DurationText.parse(argument) else { return nil }
        duration = d; text = argument
    }
    init(_ text: String) { self.init(argument: text)! }
    var defaultValueDescription: String { text }
}

extension LogFormat: ExpressibleByArgument {}

struct Sync: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Keep the rules current: watch Services and EndpointSlices and update the kernel on every change.",
        discussion: """
        The node agent. Lists and watches Services and EndpointSlices (one list+watch of each per node, \
        narrowed on the server by --namespace and -l), and after each change sends the kernel only what \
        differs, in one transaction. Changes within --min-sync-period are coalesced; every --sync-period a \
        full pass reads the kernel back and repairs any drift. While the API is unreachable the rules stay \
        as they are; one object that cannot be decoded is reported and left out, never stopping the node. \
        Holds the node's lock for its whole life: a one-shot apply or remove meanwhile exits 75. \
        SIGTERM/SIGINT stop it cleanly (exit 0); the rules stay in place unless --cleanup-on-exit.

        Examples:
          hostnet-dnat sync                                  # in a pod: in-cluster config
          hostnet-dnat sync --backend iptables --target kube-proxy
          hostnet-dnat sync --netns /proc/1234/ns/net --min-sync-period 0s --sync-period 5m --log-format json
        """)

    @Option(help: ArgumentHelp("kubeconfig file (default: in-cluster configuration in a pod, else $KUBECONFIG, then ~/.kube/config).", valueName: "path"))
    var kubeconfig: String?

    @Option(help: ArgumentHelp("kubeconfig context to use.", valueName: "name"))
    var context: String?

    @OptionGroup(title: "Selection") var resolution: ResolutionFlags
    @OptionGroup(title: "Rules") var planFlags: PlanFlags
    @OptionGroup(title: "Node") var node: NodeFlags

    @Option(help: ArgumentHelp("Coalesce changes seen within this period into one kernel transaction; 0s applies each at once (250ms, 1s, 5m, 1h).", valueName: "duration"))
    var minSyncPeriod = DurationArgument("1s")

    @Option(help: ArgumentHelp("Full pass that reads the kernel back and repairs drift.", valueName: "duration"))
    var syncPeriod = DurationArgument("5m")

    @Flag(help: "Remove our rules on SIGTERM/SIGINT (by default they stay, so a rolling update never drops traffic).")
    var cleanupOnExit = false

    @Option(help: ArgumentHelp("text (human lines on stderr) or json (one object a line).", valueName: "format"))
    var logFormat: LogFormat = .text

    @Option(help: ArgumentHelp("trace, debug, info, notice, warning, error or critical (default info).", valueName: "level"))
    var logLevel: String?

    @Option(name: .customLong("v"), help: ArgumentHelp("Verbosity as kube-proxy's -v: up to 2 info, 3-4 debug, 5 and more trace (--log-level wins).", valueName: "n"))
    var verbosity: Int?

    @Option(help: ArgumentHelp("Serve Prometheus /metrics here; 0 turns it off.", valueName: "host:port"))
    var metricsBindAddress = "127.0.0.1:10269"

    @Option(help: ArgumentHelp("Serve /healthz and /readyz here; 0 turns it off.", valueName: "host:port"))
    var healthzBindAddress = "0.0.0.0:10270"

    func validate() throws {
        guard syncPeriod.duration > .zero else { throw ValidationError("--sync-period must be longer than 0") }
    }

    func run() async throws {
        // A parent (a test runner, a shell wrapper) may have left SIGTERM/SIGINT blocked; the agent must hear them.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGTERM)
        sigaddset(&stopSignals, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &stopSignals, nil)
        try await Console.run {
            let level: Logger.Level
            let metricsAddress: ListenAddress?, healthzAddress: ListenAddress?
            do {
                level = try logLevel.map { text throws(AgentOperationsError) in try AgentLogging.level(text) }
                    ?? verbosity.map(AgentLogging.level(verbosity:)) ?? .info
                metricsAddress = try ListenAddress.parse(metricsBindAddress, flag: "--metrics-bind-address")
                healthzAddress = try ListenAddress.parse(healthzBindAddress, flag: "--healthz-bind-address")
            } catch let e as AgentOperationsError { throw CLIError(code: e.exitCode, e.description) }
            let settings = try planFlags.settings(onConflict: .skip)
            let options = try resolution.resolutionOptions()
            let context = NodeContext(netns: try node.namespace())
            if node.backend == .nftables && options.target == .kubeProxy {
                throw CLIError(.usage, "--target kube-proxy jumps into kube-proxy's iptables KUBE-SVC-… chains, which an nftables table cannot reach; use --backend iptables, or --target endpoints")
            }
            let apiOptions = KubernetesSourceOptions(kubeconfig: kubeconfig, context: self.context,
                                                     namespaces: resolution.namespaces, labelSelector: try resolution.serverSelector())
            // Refuse what can never work before owning anything: no privilege, no configuration.
            do { try context.requirePrivileges(for: "syncing rules") } catch let e as NodeError { throw e.cliError }
            let watch: KubernetesWatch
            do { watch = try KubernetesWatch(apiOptions) } catch let e as KubernetesAPIError { throw CLIError(code: e.exitCode, e.description) }
            let lock: NodeLock
            do { lock = try NodeLock.acquire(.sync, context: context, wait: .seconds(30)) } catch let e as NodeError { throw e.cliError }
            defer { withExtendedLifetime(lock) {} }

            AgentLogging.bootstrap(format: logFormat, level: level)
            let logger = Logger(label: "hostnet-dnat")
            let configuration = SyncConfiguration(options: options, settings: settings,
                                                  minSyncPeriod: minSyncPeriod.duration, syncPeriod: syncPeriod.duration,
                                                  cleanupOnExit: cleanupOnExit)
            let metrics = AgentMetrics()
            let health = HealthState(syncPeriod: syncPeriod.duration)
            let server: AgentHTTPServer
            do {
                server = try await AgentHTTPServer.start(metricsAddress: metricsAddress, healthzAddress: healthzAddress,
                                                         metrics: metrics, health: health, logger: logger)
            } catch let e as AgentOperationsError { throw CLIError(code: e.exitCode, e.description) }
            let agent = SyncAgent(configuration: configuration, source: { watch.events() },
                                  installer: NodeInstaller(context: context, backend: node.backend, iptablesVariant: node.iptables, table: settings.table),
                                  observer: AgentTelemetry(metrics: metrics, health: health), logger: logger)
            logger.info("starting", metadata: ["api": "\(watch.sourceDescription)","backend": "\(node.backend.rawValue)", "target": "\(options.target.rawValue)",
                                               "min_sync_period": "\(minSyncPeriod.text)", "sync_period": "\(syncPeriod.text)",
                                               "netns": "\(context.netns?.path ?? "self")"])
            let group = ServiceGroup(configuration: .init(
                services: [.init(service: agent)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
            var endpoints: Logger.Metadata = [:]
            if let p = server.metricsPort { endpoints["metrics_port"] = "\(p)" }
            if let p = server.healthzPort { endpoints["healthz_port"] = "\(p)" }
            if !endpoints.isEmpty { logger.info("serving", metadata: endpoints) }
            do { try await group.run() } catch {
                await server.stop()
                throw CLIError(.software, "the agent stopped: \(error)")
            }
            await server.stop()
        }
    }
}
