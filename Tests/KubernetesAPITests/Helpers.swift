import Foundation
import KubeObjects
@testable import KubernetesAPI

let testToken = "s3cr3t-t0ken-7f9c2a"

/// A temp folder with files written into it.
struct Workspace {
    let path: String
    init() throws { path = try TempDir.make(prefix: "k8s-api") }

    @discardableResult
    func write(_ relative: String, _ content: String, executable: Bool = false) throws -> String {
        let full = "\(path)/\(relative)"
        try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        try content.write(toFile: full, atomically: true, encoding: .utf8)
        if executable { try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: full) }
        return full
    }

    /// The common case: a kubeconfig at `relative` for `server`, trusting the test CA (file) and sending the
    /// test bearer token.
    func tokenKubeconfig(_ relative: String = "config", server: String) throws -> String {
        try write(relative, kubeconfig(server: server, clusterFields: "certificate-authority: \(PKI.shared.caCert)",
                                       userFields: "token: \(testToken)"))
    }

    /// An environment with no in-cluster variables and an empty HOME.
    func environment(_ extra: [String: String] = [:]) -> [String: String] {
        var env = ["HOME": "\(path)/home", "PATH": "/usr/local/bin:/usr/bin:/bin"]
        for (k, v) in extra { env[k] = v }
        return env
    }
}

/// A kubeconfig with one cluster, one user and one context.
func kubeconfig(server: String, cluster: String = "test", clusterFields: String, user: String = "admin",
                userFields: String, context: String = "test", currentContext: String? = "test") -> String {
    """
    apiVersion: v1
    kind: Config
    \(currentContext.map { "current-context: \($0)" } ?? "")
    clusters:
    - name: \(cluster)
      cluster:
        server: \(server)
    \(clusterFields.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
    users:
    - name: \(user)
      user:
    \(userFields.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
    contexts:
    - name: \(context)
      context:
        cluster: \(cluster)
        user: \(user)

    """
}

/// A handler that enforces a bearer token and serves the fake cluster.
func serving(_ cluster: FakeCluster, token: String = testToken) -> @Sendable (RecordedRequest) -> Reply {
    { r in
        guard r.authorization == "Bearer \(token)" else {
            return .json(401, status(401, "Unauthorized", "Unauthorized"))
        }
        return cluster.reply(r) ?? .json(404, status(404, "NotFound", "the server could not find the requested resource"))
    }
}

/// Runs `load` and returns its error (the test fails if it succeeds).
func loadError(_ options: KubernetesSourceOptions, _ env: [String: String]) async -> KubernetesAPIError? {
    do {
        _ = try await KubernetesSource.load(options, environment: env)
        return nil
    } catch {
        return error
    }
}

func sortedNames(_ objects: ClusterObjects) -> [String] {
    objects.services.map { "svc \($0.id)" }.sorted() + objects.endpointSlices.map { "slice \($0.id)" }.sorted()
}
