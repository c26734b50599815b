import Foundation

/// A pod's view of the API server: `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted service account.
enum InCluster {
    enum Detection {
        case found(ClusterConnection)
        /// Not in a pod.
        case absent
        /// The environment says "pod" but the service account is not mounted; says why.
        case incomplete(String)
    }

    static func detect(environment: [String: String], directory: String) throws(KubernetesAPIError) -> Detection {
        guard let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty,
              let portText = environment["KUBERNETES_SERVICE_PORT"], !portText.isEmpty else { return .absent }
        let tokenPath = (directory as NSString).appendingPathComponent("token")
        let caPath = (directory as NSString).appendingPathComponent("ca.crt")
        guard FileManager.default.fileExists(atPath: tokenPath) else {
            return .incomplete("KUBERNETES_SERVICE_HOST is set but \(tokenPath) does not exist (automountServiceAccountToken: false?)")
        }
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw KubernetesAPIError(.configuration, "in-cluster configuration: KUBERNETES_SERVICE_PORT=\(portText) is not a port number")
        }
        let bareHost = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        // Never fall back to an unverified connection, nor to the system roots: the cluster CA is required.
        guard case .success(let ca) = ConfigFile.read(caPath) else {
            throw KubernetesAPIError(.configuration,
                "in-cluster configuration: the cluster CA \(caPath) cannot be read; refusing to connect without verifying the API server")
        }
        var auth = AuthConfig()
        auth.tokenFile = tokenPath
        auth.identity = "the pod's service account"
        if case .success(let ns) = ConfigFile.read((directory as NSString).appendingPathComponent("namespace")) {
            let namespace = String(decoding: ns, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            if !namespace.isEmpty { auth.identity = "the pod's service account (namespace \(namespace))" }
        }
        let server = ServerAddress(scheme: "https", host: bareHost, port: port)
        return .found(ClusterConnection(server: server, tlsServerName: nil,
                                        trust: .certificateAuthority(PEMMaterial(bytes: [UInt8](ca), origin: caPath)),
                                        auth: auth, origin: "in-cluster configuration", clusterInfoForExec: nil))
    }
}
