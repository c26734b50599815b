import KubeObjects

/// Services and EndpointSlices from the Kubernetes API (in-cluster, or kubeconfig).
enum APISource {
    static func load(_ source: SourceOptions, namespaces: [String], selector: String?) async throws(CLIError) -> ClusterObjects {
        throw CLIError(.usage, "no input: give -f FILE (or -f - for stdin)")
    }
}
