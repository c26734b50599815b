import Foundation
import KubeObjects

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs a kubeconfig `exec` credential plugin (client.authentication.k8s.io/v1 or v1beta1) and reads the
/// ExecCredential it prints on stdout. As in client-go: the plugin gets our environment plus its `env`
/// entries plus `KUBERNETES_EXEC_INFO`; it is not interactive (stdin is /dev/null).
enum ExecPlugin {
    static let supportedVersions = ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"]

    struct Credential: Sendable {
        var token: String?
        var clientCertificate: PEMMaterial?
        var clientKey: PEMMaterial?
    }

    /// The `KUBERNETES_EXEC_INFO` document.
    static func execInfo(_ config: ExecConfig, cluster: ExecClusterInfo?) -> String {
        var spec: [(String, String)] = [("interactive", "false")]
        if config.provideClusterInfo, let cluster {
            var c: [(String, String)] = [("server", JSONText.quote(cluster.server))]
            if let n = cluster.tlsServerName { c.append(("tls-server-name", JSONText.quote(n))) }
            if cluster.insecureSkipTLSVerify { c.append(("insecure-skip-tls-verify", "true")) }
            if let ca = cluster.certificateAuthorityData {
                c.append(("certificate-authority-data", JSONText.quote(Data(ca).base64EncodedString())))
            }
            spec.append(("cluster", JSONText.object(c)))
        }
        return JSONText.object([
            ("kind", JSONText.quote("ExecCredential")),
            ("apiVersion", JSONText.quote(config.apiVersion)),
            ("spec", JSONText.object(spec)),
        ])
    }

    static func run(_ config: ExecConfig, cluster: ExecClusterInfo?, environment: [String: String],
                    timeout: Duration) async throws(KubernetesAPIError) -> Credential {
        if config.interactiveMode == "Always" {
            throw KubernetesAPIError(.configuration,
                "exec plugin \(config.command) (\(config.origin)) needs an interactive terminal (interactiveMode: Always), which hostnet-dnat never provides")
        }
        guard let executable = resolve(config.command, path: environment["PATH"]) else {
            var message = "exec plugin \(config.command) (\(config.origin)): executable not found"
            if !config.command.contains("/") { message += " on PATH" }
            if let hint = config.installHint { message += ". \(hint.trimmingCharacters(in: .whitespacesAndNewlines))" }
            throw KubernetesAPIError(.configuration, message)
        }
        var env = environment
        for (n, v) in config.env { env[n] = v }
        env["KUBERNETES_EXEC_INFO"] = execInfo(config, cluster: cluster)

        let outcome: PluginProcess.Outcome
        do {
            outcome = try await runProcess(executable: executable, arguments: config.args, environment: env, timeout: timeout)
        } catch {
            throw KubernetesAPIError(.unauthorized, "exec plugin \(config.command) (\(config.origin)) could not be started: \(error)")
        }
        let what = "exec plugin \(config.command) (\(config.origin))"
        if outcome.stdoutOverflow {
            throw KubernetesAPIError(.unauthorized, "\(what) printed more than \(stdoutLimit >> 20) MiB on stdout (the limit for an ExecCredential); it was stopped")
        }
        if outcome.timedOut {
            throw KubernetesAPIError(.unauthorized, "\(what) did not finish within \(seconds(timeout)); it was stopped")
        }
        guard outcome.exitStatus == 0 else {
            var message = "\(what) failed with exit status \(outcome.exitStatus)"
            let errText = String(decoding: outcome.stderr.suffix(2000), as: UTF8.self)
                .split(separator: "\n").suffix(5).map { InputError.printable(String($0), limit: 400) }.joined(separator: " | ")
            if !errText.isEmpty { message += ": \(errText)" }
            throw KubernetesAPIError(.unauthorized, message)
        }
        return try parse(outcome.stdout, config: config, what: what)
    }

    static func parse(_ stdout: [UInt8], config: ExecConfig, what: String) throws(KubernetesAPIError) -> Credential {
        let doc: JSONValue
        do {
            doc = try JSONParser.parse(stdout)
        } catch {
            throw KubernetesAPIError(.unauthorized,
                "\(what) printed no ExecCredential JSON on stdout (line \(error.line), column \(error.column): \(error.message))")
        }
        guard case .string("ExecCredential")? = doc["kind"] else {
            throw KubernetesAPIError(.unauthorized, "\(what) printed JSON whose kind is not ExecCredential")
        }
        guard case .string(let version)? = doc["apiVersion"], version == config.apiVersion else {
            throw KubernetesAPIError(.unauthorized,
                "\(what) answered with an apiVersion other than the \(config.apiVersion) the kubeconfig asks for")
        }
        guard let status = doc["status"], case .object = status else {
            throw KubernetesAPIError(.unauthorized, "\(what) printed an ExecCredential without status")
        }
        func str(_ key: String) -> String? {
            if case .string(let s)? = status[key], !s.isEmpty { return s }
            return nil
        }
        var cred = Credential()
        cred.token = str("token")
        if let token = cred.token, let why = CredentialCheck.problem(token) {
            throw KubernetesAPIError(.unauthorized, "\(what) returned a status.token that \(why); the value is not shown")
        }
        let cert = str("clientCertificateData"), key = str("clientKeyData")
        if (cert == nil) != (key == nil) {
            throw KubernetesAPIError(.unauthorized, "\(what) returned only one of clientCertificateData and clientKeyData")
        }
        if let cert, let key {
            cred.clientCertificate = PEMMaterial(bytes: Array(cert.utf8), origin: "clientCertificateData from \(what)")
            cred.clientKey = PEMMaterial(bytes: Array(key.utf8), origin: "clientKeyData from \(what)")
        }
        if cred.token == nil && cred.clientCertificate == nil {
            throw KubernetesAPIError(.unauthorized, "\(what) returned neither a token nor a client certificate")
        }
        return cred
    }

    /// A command with a slash is taken as it is; otherwise it is looked up on PATH.
    static func resolve(_ command: String, path: String?) -> String? {
        let fm = FileManager.default
        if command.contains("/") { return fm.isExecutableFile(atPath: command) ? command : nil }
        for dir in (path ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(command)"
            if fm.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// An ExecCredential is a few kilobytes even with a client certificate; more is a runaway plugin.
    static let stdoutLimit = 4 << 20

    /// Runs the plugin on a thread of its own (it blocks in poll and waitpid), within `timeout`.
    static func runProcess(executable: String, arguments: [String], environment: [String: String],
                           timeout: Duration) async throws -> PluginProcess.Outcome {
        try await withCheckedThrowingContinuation { (cont: CheckedContinuation<PluginProcess.Outcome, any Error>) in
            Thread.detachNewThread {
                do {
                    cont.resume(returning: try PluginProcess.run(executable: executable, arguments: arguments,
                                                                 environment: environment, timeout: timeout,
                                                                 stdoutLimit: stdoutLimit))
                } catch {
                    cont.resume(throwing: error)
                }
            }
        }
    }
}

func seconds(_ d: Duration) -> String {
    let c = d.components
    let ms = c.seconds * 1000 + c.attoseconds / 1_000_000_000_000_000
    if ms % 1000 == 0 { return "\(ms / 1000)s" }
    return "\(Double(ms) / 1000)s"
}

/// Just enough JSON writing for KUBERNETES_EXEC_INFO.
enum JSONText {
    static func quote(_ s: String) -> String { JSONValue.quoted(s) }

    static func object(_ members: [(String, String)]) -> String {
        "{" + members.map { "\(quote($0.0)):\($0.1)" }.joined(separator: ",") + "}"
    }
}
