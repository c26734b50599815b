import Foundation
import KubeObjects

/// What to read and how to find the cluster; mirrors the CLI flags.
public struct KubernetesSourceOptions: Sendable {
    /// `--kubeconfig`: this file only (it must exist). Setting it (or `context`) means "use a kubeconfig",
    /// even inside a pod, as client-go does.
    public var kubeconfig: String?
    /// `--context`: instead of the kubeconfig's current-context.
    public var context: String?
    /// `--namespace` (repeatable); empty means all namespaces.
    public var namespaces: [String]
    /// `-l`: sent to the server with the Services list. EndpointSlices are not filtered by it on the server;
    /// `load` keeps them when their `kubernetes.io/service-name` label names a Service that was listed.
    /// `KubernetesWatch` passes every slice on (a slice may arrive before its Service).
    public var labelSelector: String?
    /// Limit for each request (and for an exec credential plugin, at least 10 s).
    public var requestTimeout: Duration
    /// Where a pod's service account token and CA are mounted. Changed by tests only.
    public var serviceAccountDirectory: String
    /// Items per page (`limit`).
    public var pageSize: Int
    /// Most items one list (Services, or EndpointSlices, of one namespace or all) may return. 50,000
    /// Services with their slices are well inside the default.
    public var maxItems: Int
    /// Most pages one list may take, restarts included. A server that pages 1 item at a time reaches it
    /// at `maxPages` items; one that never stops paging, at once.
    public var maxPages: Int
    /// Time for one whole list, all its pages together (each request also has `requestTimeout`).
    public var listTimeout: Duration

    public init(kubeconfig: String? = nil, context: String? = nil, namespaces: [String] = [],
                labelSelector: String? = nil, requestTimeout: Duration = .seconds(30),
                serviceAccountDirectory: String = "/var/run/secrets/kubernetes.io/serviceaccount", pageSize: Int = 500,
                maxItems: Int = 1_000_000, maxPages: Int = 10_000, listTimeout: Duration = .seconds(600)) {
        self.kubeconfig = kubeconfig
        self.context = context
        self.namespaces = namespaces
        self.labelSelector = labelSelector
        self.requestTimeout = requestTimeout
        self.serviceAccountDirectory = serviceAccountDirectory
        self.pageSize = pageSize
        self.maxItems = maxItems
        self.maxPages = maxPages
        self.listTimeout = listTimeout
    }
}

/// Reads Services and EndpointSlices from a live API server.
public enum KubernetesSource {
    /// In-cluster when `KUBERNETES_SERVICE_HOST`/`_PORT` and the service-account token exist (unless
    /// `--kubeconfig`/`--context` are given), else kubeconfig (`--kubeconfig`, then the `KUBECONFIG` list,
    /// then ~/.kube/config), else throws `.noConfiguration` with a message saying how to give one.
    public static func load(_ options: KubernetesSourceOptions,
                            environment: [String: String] = ProcessInfo.processInfo.environment)
        async throws(KubernetesAPIError) -> ClusterObjects
    {
        try validate(options)
        let connection = try resolveConnection(options, environment: environment)
        let session = try await APISession.open(connection, timeout: options.requestTimeout, environment: environment)
        do {
            let result = try await Lister(session: session, pageSize: options.pageSize, maxItems: options.maxItems,
                                          maxPages: options.maxPages, listTimeout: options.listTimeout).listAll(options)
            await session.close()
            return result
        } catch {
            await session.close()
            throw error
        }
    }

    /// Where `load` would read from, in words ("in-cluster configuration (https://…)" or
    /// `kubeconfig … (context "prod") (https://…)`), without contacting the server.
    public static func describeSource(_ options: KubernetesSourceOptions,
                                      environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(KubernetesAPIError) -> String
    {
        let c = try resolveConnection(options, environment: environment)
        return "\(c.origin), server \(c.server.display)"
    }

    /// What the user should hear before `load` runs, without contacting the server: today, that a
    /// credential would be sent to an `http://` server in the clear (the tool otherwise never falls back
    /// to unverified transport, so this is said out loud). The CLI prints these as warnings.
    public static func warnings(_ options: KubernetesSourceOptions,
                                environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(KubernetesAPIError) -> [String]
    {
        let c = try resolveConnection(options, environment: environment)
        return transportWarnings(c)
    }

    static func transportWarnings(_ c: ClusterConnection) -> [String] {
        guard c.server.scheme == "http" else { return [] }
        let a = c.auth
        let what: String
        if a.exec != nil { what = "the token from its exec plugin" }
        else if a.token != nil || a.tokenFile != nil { what = "its bearer token" }
        else if a.username != nil { what = "its username and password" }
        else { return [] }
        return ["\(c.origin): the API server \(c.server.display) is plain http://, so \(a.identity) sends \(what) unencrypted; use https://"]
    }

    static func validate(_ options: KubernetesSourceOptions) throws(KubernetesAPIError) {
        for ns in options.namespaces where !isDNSLabel(ns) {
            throw KubernetesAPIError(.configuration,
                "--namespace \"\(InputErrorText.printable(ns))\" is not a valid namespace name (lower-case letters, digits and '-', at most 63)")
        }
        guard options.pageSize > 0, options.maxItems > 0, options.maxPages > 0, options.listTimeout > .zero else {
            throw KubernetesAPIError(.configuration, "page size, item and page limits and the list timeout must be positive")
        }
        guard options.requestTimeout > .zero else {
            throw KubernetesAPIError(.configuration, "the request timeout must be positive")
        }
    }

    static func isDNSLabel(_ s: String) -> Bool {
        guard (1...63).contains(s.utf8.count), s.first != "-", s.last != "-" else { return false }
        return s.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D }
    }

    static func resolveConnection(_ options: KubernetesSourceOptions,
                                  environment: [String: String]) throws(KubernetesAPIError) -> ClusterConnection {
        let explicitKubeconfig = options.kubeconfig != nil || options.context != nil
        var inClusterNote: String? = nil
        if !explicitKubeconfig {
            switch try InCluster.detect(environment: environment, directory: options.serviceAccountDirectory) {
            case .found(let connection): return connection
            case .absent: break
            case .incomplete(let why): inClusterNote = why
            }
        }
        let cwd = FileManager.default.currentDirectoryPath
        let candidates = Kubeconfig.candidateFiles(explicit: options.kubeconfig, environment: environment,
                                                   currentDirectory: cwd)
        guard let config = try Kubeconfig.load(paths: candidates.paths, mustExist: candidates.mustExist) else {
            var message = "no Kubernetes API configuration found: not running in a pod"
            if let inClusterNote { message = "no Kubernetes API configuration found: \(inClusterNote)" }
            message += ", and no kubeconfig at \(candidates.describedAs)."
            message += " Give one with --kubeconfig FILE (and --context NAME), set KUBECONFIG, or run inside a pod whose service account may list services and endpointslices (examples/deploy/rbac.yaml); or read objects from a file with -f"
            throw KubernetesAPIError(.noConfiguration, message)
        }
        return try config.connection(context: options.context)
    }
}
